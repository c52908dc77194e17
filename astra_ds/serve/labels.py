"""Labels that change after training: added to a finished run, or retired from its predictions, without training.

An added label gets its row from its text through the run's final encoder: its label-text embedding e, mapped by
the linear map that takes the trained labels' embeddings to their rows (astra_ds/table/text_to_row.py: a raw e
would outrank the trained rows and push good old labels out), and e itself as its label-text vector for dual
scoring; the addition's rows are scored with a scale chosen on the run's training queries so that the new labels
take no more than their share of the top-1s (serve/row_scale.py: mapped rows still do where label texts say
little), recorded in the card's row_scales. The rows are appended to the table (its optimizer state starting at
zero), the label names, the model card and the serving index (added in place: every index kind astra_ds builds
takes new vectors without retraining). A retired label keeps its id and its row and is skipped by every search,
exact and approximate; `restore` undoes it.

A change publishes a new version of the model: its manifest (and so the version `serve` and `/v1/model` report)
moves. While it is under way the run is not a finished run (no manifest), and `labels_change.json` says what
was being done: a crash at any point is finished by running `astra-ds labels finish --run-dir R`, which
re-applies the change (each step writes what it writes again, never twice).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from astra_ds import layout
from astra_ds.config import load_config
from astra_ds.digests import DigestCache, file_digest
from astra_ds.errors import UserError
from astra_ds.files import utf8_lines, write_atomically
from astra_ds.index.label_index import LabelIndex
from astra_ds.run_lock import RunLock
from astra_ds.scoring import ScoringRows, exact_topk
from astra_ds.serve.ann import load_serving_index, stored_scoring_rows
from astra_ds.serve.card import ModelCard, label_names, read_card, retired_ids, write_run_manifest
from astra_ds.serve.row_scale import calibrated_row_scale, training_queries
from astra_ds.serve.verified import verified_digests
from astra_ds.table.store import open_table
from astra_ds.table.text_to_row import fit_ranges, fit_text_to_row, read_stored_rows

log = logging.getLogger("astra_ds")

# texts -> their (n, d) unit embeddings through the run's final encoder: as label texts (XCModel.embed_label_texts)
# or as queries
Embed = Callable[[list[str]], torch.Tensor]


@dataclass
class NewLabels:
    texts: list[str]
    names: list[str]  # the text itself where the file gave no name


def read_label_file(path: Path) -> NewLabels:
    """One label a line: its text; or `name<TAB>text`; or JSON lines {"text": ..., "name": ...} ("name" optional).
    UTF-8 (a line with other bytes is refused, naming it); blank lines are skipped."""
    if not path.is_file():
        raise UserError(f"no label file at {path}")
    texts, names = [], []
    for number, line in enumerate(utf8_lines(path.read_bytes(), str(path)), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
                text, name = record["text"], record.get("name", record["text"])
            except (ValueError, KeyError, TypeError):
                raise UserError(f'{path}, line {number}: not a JSON object with a "text"') from None
        elif "\t" in line:
            name, text = line.split("\t", 1)
        else:
            name = text = line
        if not isinstance(text, str) or not text.strip() or not isinstance(name, str) or not name.strip():
            raise UserError(f"{path}, line {number}: an empty label text or name")
        texts.append(text.strip())
        names.append(name.strip())
    if not texts:
        raise UserError(f"{path} holds no label")
    return NewLabels(texts, names)


def _label_names(run_dir: Path, num_labels: int) -> list[str]:
    """The run's label names, or their ids where it has none."""
    return label_names(run_dir, num_labels) or [str(i) for i in range(num_labels)]


def _check_new_names(existing: list[str], new: list[str]) -> None:
    seen, known = set(), set(existing)
    for name in new:
        if name in known:
            raise UserError(f"label {name!r} exists already (id {existing.index(name)})")
        if name in seen:
            raise UserError(f"label {name!r} is twice in the new labels")
        seen.add(name)


def _begin(run_dir: Path, change: dict) -> None:
    """The change is recorded, then the run withdrawn: from here until _publish it is not a finished run."""
    write_atomically(run_dir / layout.LABELS_CHANGE, json.dumps(change))
    (run_dir / layout.MANIFEST).unlink(missing_ok=True)


def _publish(run_dir: Path, known: DigestCache | None) -> None:
    """The new version: its manifest (the digests of the files the change left as they were `known`), then the
    serving index stamped with it."""
    write_run_manifest(run_dir, known)
    info_path = run_dir / layout.ANN_INFO
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        info["model"] = file_digest(run_dir / layout.MANIFEST)
        write_atomically(info_path, json.dumps(info, indent=2))
    (run_dir / layout.LABELS_CHANGE).unlink()


def _resize(group, num_labels: int) -> None:
    """Every array of a zarr table group (rows, optimizer state) to `num_labels` rows; new rows read as zeros."""
    for name, array in group.arrays():
        array.resize((num_labels, *array.shape[1:]))
    for _, subgroup in group.groups():
        _resize(subgroup, num_labels)
    group.attrs["num_labels"] = num_labels


def _write_rows(array, start: int, rows: torch.Tensor, bfloat16: bool) -> None:
    values = rows.to(torch.bfloat16).view(torch.int16) if bfloat16 else rows.float()
    array[start:start + len(rows)] = values.numpy().astype(array.dtype, copy=False)


class _Block:
    """Rows [start, start + len(rows)) held in memory: what ScoringRows reads."""

    def __init__(self, rows: torch.Tensor, start: int):
        self.rows, self.start, self.end, self.dim, self.device = rows, start, start + len(rows), rows.shape[1], rows.device

    def block_rows(self, start: int, end: int) -> torch.Tensor:
        return self.rows[start - self.start:end - self.start]


def _rows_from_texts(run_dir: Path, num_labels: int, embeddings: torch.Tensor, embed: Embed) -> torch.Tensor:
    """The new labels' rows: their text embeddings through the map fitted on the run's trained labels (their
    stored label-text embeddings, or their names embedded now)."""
    ranges = fit_ranges(num_labels)
    if (run_dir / layout.LABEL_EMBEDDINGS).is_dir():
        texts = read_stored_rows(run_dir / layout.LABEL_EMBEDDINGS, ranges)
    else:
        names = label_names(run_dir, num_labels)
        if names is None:
            log.warning("%s has no label texts to learn what a trained row looks like: the new labels' rows are "
                        "their text embeddings, which may outrank the trained labels", run_dir)
            return embeddings
        texts = embed([names[i] for r in ranges for i in r])
    text_to_row = fit_text_to_row(texts, read_stored_rows(run_dir / layout.TABLE, ranges))
    return (embeddings.double() @ text_to_row).float()


def _best_old_scores(run_dir: Path, card: ModelCard, queries: torch.Tensor) -> torch.Tensor:
    """Each query's best score over the run's labels (retired ones skipped): from its serving index where it has
    one, as serving ranks, else exact."""
    retired = retired_ids(run_dir)
    excluded = retired if len(retired) else None
    index = load_serving_index(run_dir, load_config(run_dir / layout.CONFIG).index, card, card.label_text_weight)
    if index is not None:
        return torch.from_numpy(index.search(queries, 1, excluded)[0][:, 0])
    scores, _ = exact_topk(queries, stored_scoring_rows(run_dir, card), 1, normalize_rows=False, progress=False,
                           excluded=excluded)
    return scores[:, 0]


def _row_scale(run_dir: Path, card: ModelCard, texts: list[str], embed: Embed, encode_queries: Embed) -> float:
    """The scale of the new labels' rows, chosen on the run's training queries (1 where they are gone)."""
    queries = training_queries(load_config(run_dir / layout.CONFIG), card, card.num_labels)
    if queries is None:
        return 1.0
    embeddings = embed(texts)
    rows = _rows_from_texts(run_dir, card.num_labels, embeddings, embed)
    encoded = encode_queries(queries)
    return calibrated_row_scale(encoded, _best_old_scores(run_dir, card, encoded), rows, embeddings, card,
                                card.num_labels - len(retired_ids(run_dir)))


def _apply_add(run_dir: Path, change: dict, embed: Embed) -> None:
    start, texts, names = change["num_labels"], change["texts"], change["names"]
    end = start + len(texts)
    card = ModelCard.load(run_dir / layout.MODEL_CARD)  # verified before the change began
    row_scales = [r for r in card.row_scales if r[0] < start] + [[start, end, change.get("row_scale", 1.0)]]  # once
    card = dataclasses.replace(card, num_labels=end, row_scales=row_scales)
    embeddings = embed(texts)
    table = open_table(run_dir / layout.TABLE, mode="r+")
    bfloat16 = table.attrs.get("dtype", "float32") == "bfloat16"
    rows = _rows_from_texts(run_dir, start, embeddings, embed)
    _resize(table, end)
    _write_rows(table["rows"], start, rows, bfloat16)
    if (run_dir / layout.LABEL_EMBEDDINGS).is_dir():
        label_embeddings = open_table(run_dir / layout.LABEL_EMBEDDINGS, mode="r+")
        _resize(label_embeddings, end)
        _write_rows(label_embeddings["rows"], start, embeddings, False)
    write_atomically(run_dir / layout.LABEL_NAMES, "\n".join(_label_names(run_dir, start) + names))
    card.save(run_dir / layout.MODEL_CARD)
    if (run_dir / layout.ANN_INDEX).is_file():
        _add_to_index(run_dir, load_config(run_dir / layout.CONFIG).index, _Block(rows, start),
                      _Block(embeddings, start), card)


def _add_to_index(run_dir: Path, cfg, rows: _Block, label_embeddings: _Block, card: ModelCard) -> None:
    """The new rows' scoring vectors added to the serving index, in place (unless a crash came after that)."""
    info_path = run_dir / layout.ANN_INFO
    info = json.loads(info_path.read_text())
    index = LabelIndex(cfg, normalize_rows=False)
    index.load(run_dir / layout.ANN_INDEX, _Block(torch.empty(rows.start, 0), 0))
    if index.index.ntotal == rows.start:
        vectors = ScoringRows(rows, card.normalize_rows, label_embeddings, info["label_text_weight"], card.row_scales)
        index.index.add(np.ascontiguousarray(vectors.block_rows(rows.start, rows.end).numpy()))
        tmp = run_dir / (layout.ANN_INDEX + layout.TMP_SUFFIX)
        index.save(tmp)
        tmp.replace(run_dir / layout.ANN_INDEX)
    info |= {"num_labels": rows.end, "digest": file_digest(run_dir / layout.ANN_INDEX)}
    write_atomically(info_path, json.dumps(info, indent=2))


def _apply(run_dir: Path, change: dict, embed: Embed, known: DigestCache | None = None) -> None:
    if change["change"] == "add":
        _apply_add(run_dir, change, embed)
    else:
        write_atomically(run_dir / layout.RETIRED_LABELS, json.dumps({"retired": change["retired"]}))
    _publish(run_dir, known)


def _change(run_dir: Path, make_change, embed: Embed) -> dict:
    """Under the run's lock: a pending change finished first, then `make_change(card)` (a dict, checked before
    anything is written) applied and published."""
    lock = RunLock(run_dir, "--run-dir")
    try:
        finish_pending(run_dir, embed, locked=True)
        card = read_card(run_dir)  # verified
        known = verified_digests(run_dir)
        change = make_change(card)
        _begin(run_dir, change)
        _apply(run_dir, change, embed, known)
        return change
    finally:
        lock.release()


def finish_pending(run_dir: Path, embed: Embed, locked: bool = False) -> bool:
    """Finishes a `labels` change a crash interrupted; whether there was one."""
    path = run_dir / layout.LABELS_CHANGE
    if not path.is_file():
        return False
    if not locked:
        lock = RunLock(run_dir, "--run-dir")
        try:
            return finish_pending(run_dir, embed, locked=True)
        finally:
            lock.release()
    change = json.loads(path.read_text())
    log.info("finishing the interrupted `labels %s` of %s", change["change"], run_dir)
    _apply(run_dir, change, embed)
    return True


def _remembering(embed: Embed) -> Embed:
    """`embed` that computes each list of texts once."""
    done: dict[tuple[str, ...], torch.Tensor] = {}

    def embed_once(texts: list[str]) -> torch.Tensor:
        key = tuple(texts)
        if key not in done:
            done[key] = embed(texts)
        return done[key]

    return embed_once


def add_labels(run_dir: str | Path, labels: NewLabels, embed: Embed, encode_queries: Embed,
               row_scale: float | None = None) -> range:
    """Appends `labels` to the finished run at `run_dir`; returns their ids. `row_scale`: the scale of their rows'
    scores, instead of the one chosen on the run's training queries."""
    run_dir = Path(run_dir)
    if row_scale is not None and not 0 <= row_scale < float("inf"):
        raise UserError(f"the row scale must be a number >= 0, not {row_scale}")
    embed = _remembering(embed)  # the scale and the change embed the same texts: the encoder runs once for them

    def make_change(card: ModelCard) -> dict:
        _check_new_names(_label_names(run_dir, card.num_labels), labels.names)
        scale = row_scale if row_scale is not None else _row_scale(run_dir, card, labels.texts, embed, encode_queries)
        return {"change": "add", "num_labels": card.num_labels, "texts": labels.texts, "names": labels.names,
                "row_scale": scale}

    change = _change(run_dir, make_change, embed)
    ids = range(change["num_labels"], change["num_labels"] + len(labels.texts))
    log.info("%d labels added to %s: ids %d-%d, rows scaled by %.2f", len(ids), run_dir, ids.start, ids.stop - 1,
             change["row_scale"])
    return ids


def resolve_ids(run_dir: Path, num_labels: int, ids: list[int] = (), names: list[str] = ()) -> list[int]:
    """Label ids from ids and names, each checked (in range, a known and unambiguous name)."""
    bad = [i for i in ids if not 0 <= i < num_labels]
    if bad:
        raise UserError(f"label id {bad[0]} is out of range: the model has ids 0-{num_labels - 1}")
    resolved = list(ids)
    if names:
        by_name: dict[str, list[int]] = {}
        for i, name in enumerate(_label_names(run_dir, num_labels)):
            by_name.setdefault(name, []).append(i)
        for name in names:
            found = by_name.get(name, [])
            if len(found) != 1:
                raise UserError(f"no label is named {name!r}" if not found else
                                f"{len(found)} labels are named {name!r} (ids {found[:5]}): give --ids instead")
            resolved.append(found[0])
    if not resolved:
        raise UserError("no label given: --ids or --names")
    return resolved


def retire_labels(run_dir: str | Path, ids: list[int], names: list[str], embed: Embed) -> list[int]:
    """Removes labels from every prediction of the run (ids kept); returns all the retired ids. (`embed`: for a
    pending addition a crash interrupted.)"""
    return _set_retired(Path(run_dir), ids, names, embed, retire=True)


def restore_labels(run_dir: str | Path, ids: list[int], names: list[str], embed: Embed) -> list[int]:
    """Undoes retire_labels for these labels; returns the ids still retired."""
    return _set_retired(Path(run_dir), ids, names, embed, retire=False)


def _set_retired(run_dir: Path, ids, names, embed: Embed, retire: bool) -> list[int]:
    def make_change(card: ModelCard) -> dict:
        chosen = set(resolve_ids(run_dir, card.num_labels, ids, names))
        before = set(retired_ids(run_dir).tolist())
        retired = sorted(before | chosen if retire else before - chosen)
        if len(retired) == card.num_labels:
            raise UserError(f"retiring these would retire all {card.num_labels} labels: nothing left to predict")
        return {"change": "retire" if retire else "restore", "retired": retired}

    retired = _change(run_dir, make_change, embed)["retired"]
    log.info("%s: %d labels retired", run_dir, len(retired))
    return retired
