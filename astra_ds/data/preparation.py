"""`astra-ds data prepare`: a dataset read once, tokenised and written as memory-mappable arrays, so that training
reads nothing but a manifest at start-up and every rank of a host shares one page cache of the data.

The source is cut into units of fixed row ranges (astra_ds/data/sources.py). A unit is written whole into a
temporary directory, renamed into place with its `done.json` (the digest of each array), so that:

- preparation is parallel: units go to worker processes (`--workers W`), or to the tasks of a cluster job
  (`--part i/n`: unit k to part k mod n, no process group needed);
- it resumes: a rerun skips the units that verify, and a kill loses at most the units in flight; a directory
  prepared from other sources or settings is refused;
- the manifest (`manifest.json`), written last by whoever finishes the last unit, means the directory is ready.

A dataset in any other layout given to a run (data.path) is prepared by the same code, in-process, into the cache
(`prepare_cached`), so training reads one kind of data.

Each unit of the train split writes its rows to the training or the validation part, chosen by a keyed hash of the
row's number in the source, of its group's name, or of its set of positives (data.validation_fraction,
data.validation_group, train.seed): the same rows whatever the workers or units. A part is five arrays: token ids
(uint16 where the vocabulary fits) and their row offsets, label ids and their row offsets (positives are 1: no
values), and each row's length in tokens; the label texts' part also holds the texts themselves (UTF-8 bytes and
their offsets), the names a trained run gives its labels; with data.label_texts_as_queries, its units also hold the
label texts as queries (tokens at max_len, each label its text's one positive), which training appends to the
training part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import chain
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

from astra_ds.config import DataConfig, RunConfig
from astra_ds.data.encoding import backend_of, encode
from astra_ds.data.readers import filter_path, read_pair_file
from astra_ds.data.sources import Unit, UnitRows, group_key, open_source
from astra_ds.errors import DataError, UserError
from astra_ds.digests import file_digest
from astra_ds.files import fsync_path, locked, output_file, user_cache_dir, write_atomically
from astra_ds.progress import progress as progress_of
from astra_ds.hashing import GOLDEN, mix64

log = logging.getLogger("astra_ds")

FORMAT = "astra_ds.prepared/1"
MANIFEST, PLAN, UNITS, DONE, LABEL_COUNTS = "manifest.json", "plan.json", "units", "done.json", "label_counts.npy"
TEST_FILTER = "test_filter.npz"
ARRAYS = ("tokens", "token_offsets", "lengths", "labels", "label_offsets")
PARTS = {"train": ("train", "validation"), "test": ("test",), "labels": ("labels",)}
LABEL_QUERIES = "label_queries"  # a part of the label texts' units, with data.label_texts_as_queries
HISTOGRAM_CAP = 1024  # labels a query: rows with more are counted in the last bin
CACHE_UNIT_ROWS = 100_000  # a run preparing its data in its own process holds one unit's texts and labels at a time


@dataclass(frozen=True)
class Settings:
    """What the prepared arrays depend on besides the source: a rerun with other settings is refused."""

    tokenizer: str  # the tokenizer's fingerprint
    encoder: str  # encoder.model, for messages
    max_len: int
    label_max_len: int
    validation_fraction: float
    validation_group: str
    seed: int
    token_dtype: str
    num_labels: int
    on_bad_text: str
    on_bad_row: str
    label_queries: bool  # data.label_texts_as_queries: each label text also a query at max_len

    @staticmethod
    def of(cfg: RunConfig, tokenizer, num_labels: int) -> "Settings":
        from astra_ds.data.tokens import tokenizer_fingerprint

        dtype = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else "uint32"
        return Settings(tokenizer_fingerprint(tokenizer), cfg.encoder.model, cfg.data.max_len,
                        cfg.siamese.label_max_len, cfg.data.validation_fraction, cfg.data.validation_group,
                        cfg.train.seed, dtype, num_labels,
                        cfg.data.on_bad_text, cfg.data.on_bad_row, cfg.data.label_texts_as_queries)


def validation_mask(keys: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each source row is held out, from its key (its number in the train split, or its group's hash):
    splitmix64 of the key keyed by the seed, as a number in [0, 1), below `fraction`."""
    with np.errstate(over="ignore"):
        z = mix64(keys.astype(np.uint64) + np.uint64(seed) * GOLDEN + GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _ragged(rows: list, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets): the rows' values one after another, and where each row begins (and the last ends)."""
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, rows), np.int64, len(rows)), out=offsets[1:])
    values = np.fromiter(chain.from_iterable(rows), dtype=dtype, count=int(offsets[-1]))
    return values, offsets


def _encoded(tokenizer, texts: list[str], max_len: int, dtype, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """(token ids one row after another, each row's length), encoded `chunk` texts at a time: the tokenizer's
    per-text objects and the ids as Python ints (~1 KB a text together) are held for one chunk, not the unit."""
    tokens, lengths = [np.zeros(0, dtype)], [np.zeros(0, np.int64)]
    for start in range(0, len(texts), chunk):
        ids = encode(tokenizer, texts[start:start + chunk], max_len)
        lengths.append(np.fromiter(map(len, ids), np.int64, len(ids)))
        tokens.append(np.fromiter(chain.from_iterable(ids), dtype, int(lengths[-1].sum())))
    return np.concatenate(tokens), np.concatenate(lengths)


def _token_arrays(tokens: np.ndarray, lengths: np.ndarray, chosen: np.ndarray) -> dict[str, np.ndarray]:
    """The token ids, row offsets and lengths of the `chosen` rows (a boolean a row) of encoded rows."""
    kept = lengths[chosen]
    offsets = np.zeros(len(kept) + 1, np.int64)
    np.cumsum(kept, out=offsets[1:])
    return {"tokens": tokens[np.repeat(chosen, lengths)], "token_offsets": offsets.astype(np.uint32),
            "lengths": kept.astype(np.uint16)}


def array_digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def _unit_arrays(rows: UnitRows, unit: Unit, settings: Settings, tokenizer) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of each part of the unit."""
    max_len = settings.label_max_len if unit.split == "labels" else settings.max_len
    tokens, lengths = _encoded(tokenizer, rows.texts, max_len, settings.token_dtype)
    held = (validation_mask(_validation_keys(rows, settings.validation_group), settings.validation_fraction,
                            settings.seed) if unit.split == "train" else np.zeros(len(rows.texts), bool))
    parts = {}
    for part, chosen in zip(PARTS[unit.split], (~held, held)):
        keep = np.flatnonzero(chosen)
        arrays = _token_arrays(tokens, lengths, chosen)
        if rows.labels is not None:
            labels, label_offsets = _ragged([sorted(set(rows.labels[i])) for i in keep], np.uint32)
            arrays |= {"labels": labels, "label_offsets": label_offsets.astype(np.uint32)}
        if unit.split == "labels":  # the label names a run publishes (label_names.txt), as UTF-8 bytes
            names, name_offsets = _ragged([text.encode("utf-8") for text in rows.texts], np.uint8)
            arrays |= {"names": names, "name_offsets": name_offsets.astype(np.uint64)}
        parts[part] = arrays
    if unit.split == "labels" and settings.label_queries:
        parts[LABEL_QUERIES] = _label_queries(rows.texts, unit.first_row, settings, tokenizer)
    return parts


def _validation_keys(rows: UnitRows, group: str) -> np.ndarray:
    """What each row's side of the validation split is drawn from: its key (its number, or its group's hash) or,
    grouped by labels, the hash of its set of positives (a row without any keeps its own key)."""
    if group == "row":
        return rows.keys
    return np.array([group_key(",".join(map(str, sorted(set(ids))))) if ids else key
                     for ids, key in zip(rows.labels, rows.keys.tolist())], np.uint64)


def _label_queries(texts: list[str], first_label: int, settings: Settings, tokenizer) -> dict[str, np.ndarray]:
    """The label texts that hold a word as queries (at max_len), each with its label as its one positive."""
    keep = [i for i, text in enumerate(texts) if text.strip()]
    tokens, lengths = _encoded(tokenizer, [texts[i] for i in keep], settings.max_len, settings.token_dtype)
    return _token_arrays(tokens, lengths, np.ones(len(keep), bool)) | {
        "labels": (first_label + np.array(keep, np.int64)).astype(np.uint32),
        "label_offsets": np.arange(len(keep) + 1, dtype=np.uint32)}


def prepare_unit(unit: Unit, source, settings: Settings, tokenizer, out: Path) -> None:
    """Unit `unit` of `source` written into out/units/<name>: whole (renamed into place when complete) or not at
    all."""
    final = out / UNITS / unit.name
    tmp = final.with_name(f"{unit.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_unit(unit, source, settings, tokenizer, tmp)
        os.replace(tmp, final)
    except Exception:  # a full disk, a bad row: nothing of the unit stays (a kill leaves tmp, removed at the end)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final.parent)


def _write_unit(unit: Unit, source, settings: Settings, tokenizer, tmp: Path) -> None:
    tmp.mkdir(parents=True)
    rows = source.read(unit)
    bad = [i for i, text in enumerate(rows.texts) if "\ufffd" in text]  # undecodable bytes were read as U+FFFD
    texts = "label texts" if unit.split == "labels" else f"{unit.split} texts"
    if bad and settings.on_bad_text == "error":
        raise DataError(f"the {texts} hold bytes that are not UTF-8, first at line {unit.first_row + bad[0] + 1} "
                        "(data.on_bad_text=replace reads them with U+FFFD)")
    parts = _unit_arrays(rows, unit, settings, tokenizer)
    done = {"unit": asdict(unit), "parts": {}, "skipped": {"rows": len(rows.skipped),
                                                                 "first": (rows.skipped or [None])[0]},
            "bad_text": {"rows": len(bad), "first_line": unit.first_row + bad[0] + 1 if bad else None}}
    for part, arrays in parts.items():
        for name, array in arrays.items():
            np.save(tmp / f"{part}.{name}.npy", array)
        lengths = arrays["lengths"]
        entry = {"rows": len(lengths), "tokens": len(arrays["tokens"]),
                 "digests": {name: array_digest(array) for name, array in arrays.items()},
                 "length_histogram": np.bincount(lengths, minlength=1).tolist()}
        if "labels" in arrays:
            per_query = np.minimum(np.diff(arrays["label_offsets"].astype(np.int64)), HISTOGRAM_CAP)
            entry |= {"positives": len(arrays["labels"]), "labels_histogram": np.bincount(per_query).tolist()}
        done["parts"][part] = entry
    with open(tmp / DONE, "w") as f:
        json.dump(done, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def changed_arrays(unit_dir: Path, part: str, digests: dict[str, str]) -> list[Path]:
    """The arrays of `part` in `unit_dir` that are missing, unreadable or not of their digest."""
    changed = []
    for name, digest in digests.items():
        path = unit_dir / f"{part}.{name}.npy"
        try:
            same = array_digest(np.load(path, mmap_mode="r")) == digest
        except (OSError, ValueError):
            same = False
        if not same:
            changed.append(path)
    return changed


def unit_done(out: Path, unit: Unit, verify: bool = True) -> dict | None:
    """The done record of `unit` when it is prepared (and its arrays verify); None otherwise."""
    directory = out / UNITS / unit.name
    try:
        done = json.loads((directory / DONE).read_text())
        if done["unit"] != json.loads(json.dumps(asdict(unit))):
            return None
        if verify and any(changed_arrays(directory, part, entry["digests"]) for part, entry in done["parts"].items()):
            return None
    except (OSError, ValueError, KeyError):
        return None
    return done


# ---- the job ----------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(make_tokenizer: Callable, data: DataConfig, settings: Settings, out: str) -> None:
    from astra_ds.libraries import quiet_tokenizers

    quiet_tokenizers()
    _WORKER.update(source=open_source(data), tokenizer=make_tokenizer(), settings=settings, out=Path(out))


def _worker_unit(unit: Unit) -> str:
    prepare_unit(unit, _WORKER["source"], _WORKER["settings"], _WORKER["tokenizer"], _WORKER["out"])
    return unit.name


def _plan(out: Path, source, settings: Settings, unit_rows: int) -> list[Unit]:
    """The units, as out/plan.json records them: written by the first run (one scan of the source files); a rerun
    reads them there, after checking that the sources and settings are those of the plan."""
    path = out / PLAN
    plan = {"format": FORMAT, "settings": asdict(settings), "sources": source.fingerprint(), "unit_rows": unit_rows}
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [key for key in plan if before.get(key) != json.loads(json.dumps(plan[key]))]
        if changed:
            what = {"format": "another version", "settings": "other settings", "sources": "other source files",
                    "unit_rows": "another --unit-rows"}
            raise UserError(f"{out} was prepared (in part) from {', '.join(what[k] for k in changed)}: prepare into "
                            "another directory, or remove it first")
        return [Unit(**{**unit, "offsets": tuple(unit["offsets"])}) for unit in before["units"]]
    units = source.units(unit_rows)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(plan | {"units": [asdict(u) for u in units]}, indent=1, sort_keys=True))
    return units


def prepare(cfg: RunConfig, out: str | Path, make_tokenizer: Callable, workers: int = 1,
            part: tuple[int, int] = (0, 1), unit_rows: int = 1_000_000, progress: bool = True) -> bool:
    """Prepares the units of part `part` (i, n) of cfg.data.path into `out` (`workers` processes, each with the
    tokenizer of `make_tokenizer()`, a picklable callable); writes the manifest when every unit is done. Whether
    the directory is ready."""
    out = Path(out)
    source = open_source(cfg.data)
    tokenizer = make_tokenizer()
    settings = Settings.of(cfg, tokenizer, source.num_labels)
    units = _plan(out, source, settings, unit_rows)
    if (out / MANIFEST).is_file():
        log.info("%s is prepared already (%s)", out, MANIFEST)
        return True
    index, count = part
    mine = [u for u in units if u.index % count == index]
    todo = [u for u in mine if unit_done(out, u) is None]
    log.info("%s: %d units of %d rows, %d for this part, %d to prepare", out, len(units), unit_rows, len(mine),
             len(todo))
    (out / UNITS).mkdir(exist_ok=True)
    if workers > 1 and len(todo) > 1:
        context = get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_worker_init,
                                 initargs=(backend_of(tokenizer) or make_tokenizer, cfg.data, settings,
                                           str(out))) as pool:
            for _ in progress_of(pool.map(_worker_unit, todo), "prepare", progress, "unit", total=len(todo)):
                pass
    else:
        for unit in progress_of(todo, "prepare", progress and len(todo) > 1, "unit"):
            prepare_unit(unit, source, settings, tokenizer, out)
    done = {u.name: unit_done(out, u, verify=False) for u in units}  # renamed into place whole
    if any(record is None for record in done.values()):
        return False  # other parts still at work: the last to finish writes the manifest
    write_manifest(out, units, done, settings, Path(cfg.data.path))
    return True


def prepare_cached(cfg: RunConfig, tokenizer) -> Path:
    """cfg.data.path prepared in this process into the cache (data.cache_dir), the first time it is asked for: the
    cache's directory is keyed by the source files' sizes and modification times and by the settings, so a change
    to either prepares it again. A process that finds another preparing it (a rank of the same run) waits."""
    source = Path(cfg.data.path)
    if not source.is_dir():
        raise DataError(f"dataset directory not found: {source}")
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else user_cache_dir() / "prepared"
    out = root / f"{source.resolve().name}-{_cache_key(cfg, tokenizer, source)}"
    with locked(out.with_name(out.name + ".lock")):
        if not (out / MANIFEST).is_file():
            log.info("preparing %s into %s (once; `astra-ds data prepare` does it ahead of a run, in parallel)",
                     source, out)
            prepare(cfg, out, lambda: tokenizer, unit_rows=CACHE_UNIT_ROWS)
    return out


def _cache_key(cfg: RunConfig, tokenizer, source: Path) -> str:
    from astra_ds.data.tokens import tokenizer_fingerprint

    data = {k: v for k, v in asdict(cfg.data).items() if k not in ("path", "cache_dir", "max_held_queries")}
    files = {str(path.relative_to(source)): [path.stat().st_size, path.stat().st_mtime_ns]
             for path in sorted(source.rglob("*")) if path.is_file()}
    key = {"format": FORMAT, "source": str(source.resolve()), "files": files, "data": data,
           "encoder": cfg.encoder.model, "tokenizer": tokenizer_fingerprint(tokenizer),
           "label_max_len": cfg.siamese.label_max_len, "seed": cfg.train.seed}
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()


def _test_filter(source: Path, out: Path, test_rows: int, skipped: int, num_labels: int) -> dict | None:
    """The dataset's filter_labels_test.txt (test query, label pairs left out of the evaluation), copied as a
    sparse matrix; its manifest entry, or None without one."""
    path = filter_path(source, "test")
    if path is None:
        return None
    if skipped:
        log.warning("%s is left out of the prepared data: %d test rows were skipped, and its rows are the source's",
                    path, skipped)
        return None
    matrix = read_pair_file(path, num_labels, num_rows=test_rows, what="label")
    with output_file(out / TEST_FILTER) as tmp:
        sp.save_npz(tmp, matrix)
    return {"file": TEST_FILTER, "pairs": int(matrix.nnz), "digest": file_digest(out / TEST_FILTER)}


def write_manifest(out: Path, units: list[Unit], done: dict[str, dict], settings: Settings, source: Path) -> None:
    """The label counts of the training part (propensities need only these and N), the test split's filter, and
    the manifest, last."""
    counts = np.zeros(settings.num_labels, np.int64)
    splits: dict[str, dict] = {}
    for unit in units:
        for part, entry in done[unit.name]["parts"].items():
            split = splits.setdefault(part, {"rows": 0, "tokens": 0, "positives": 0, "units": [],
                                             "length_histogram": [], "labels_histogram": []})
            split["units"].append({"name": unit.name, "rows": entry["rows"], "digests": entry["digests"]})
            split["rows"] += entry["rows"]
            split["tokens"] += entry["tokens"]
            split["positives"] += entry.get("positives", 0)
            for key in ("length_histogram", "labels_histogram"):
                split[key] = _add(split[key], entry.get(key, []))
            if part == "train":
                labels = np.load(out / UNITS / unit.name / "train.labels.npy", mmap_mode="r")
                counts += np.bincount(labels, minlength=settings.num_labels)
    skipped = {split: sum(done[u.name]["skipped"]["rows"] for u in units if u.split == split)
               for split in ("train", "test")}
    first = next((done[u.name]["skipped"]["first"] for u in units if done[u.name]["skipped"]["first"]), None)
    if first:
        log.warning("%s malformed rows left out (data.on_bad_row=skip), the first: %s",
                    " and ".join(f"{n:,} {split}" for split, n in skipped.items() if n), first)
    for split in ("train", "test", "labels"):
        bad = [done[u.name]["bad_text"] for u in units
               if u.split == split and done[u.name].get("bad_text", {"rows": 0})["rows"]]
        if bad:
            texts = "label texts" if split == "labels" else f"{split} texts"
            log.warning("%s: %d %s hold bytes that are not UTF-8 (read as U+FFFD), first at line %d", source,
                        sum(b["rows"] for b in bad), texts, bad[0]["first_line"])
    np.save(out / LABEL_COUNTS, counts)
    test_filter = _test_filter(source, out, splits.get("test", {}).get("rows", 0), skipped["test"],
                               settings.num_labels)
    for path in (out / LABEL_COUNTS, *([out / TEST_FILTER] if test_filter else [])):
        fsync_path(path)  # on disk before the manifest says the directory is ready
    digest = hashlib.blake2b(json.dumps([asdict(settings), splits], sort_keys=True).encode(), digest_size=16)
    digest.update(array_digest(counts).encode())
    manifest = {"format": FORMAT, "settings": asdict(settings), "splits": splits, "skipped_rows": skipped,
                "test_filter": test_filter,
                "label_counts_digest": array_digest(counts), "fingerprint": digest.hexdigest()}
    for leftover in (out / UNITS).glob("*.tmp-*"):  # of killed runs: every unit is done, none is in flight
        shutil.rmtree(leftover, ignore_errors=True)
    write_atomically(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    log.info("%s is ready: %s", out, ", ".join(f"{name} {split['rows']:,} rows" for name, split in splits.items()))


def _add(a: list[int], b: list[int]) -> list[int]:
    total = np.zeros(max(len(a), len(b)), np.int64)
    total[:len(a)] += np.asarray(a, np.int64)
    total[:len(b)] += np.asarray(b, np.int64)
    return total.tolist()


def parse_part(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n), 0 <= i < n."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--part must be i/n (this task's part of n), not {text!r}") from None
    if not 0 <= index < count:
        raise UserError(f"--part {text}: i must be in [0, n)")
    return index, count
