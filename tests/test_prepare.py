"""`astra-ds data prepare`: the arrays against the dataset read whole (a dense reference), the same bytes whatever
the workers, parts or units, and a fault at each write point (the fault matrix's row of `data prepare`) then a
rerun that ends as an uninterrupted preparation."""

import functools
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from astra_ds.cli.main import main
from astra_ds.config import load_config
from astra_ds.data.encoding import encode
from astra_ds.data.prepared import PreparedDirectory
from astra_ds.data.preparation import MANIFEST, UNITS, _encoded, prepare, validation_mask
from astra_ds.data.prepare import prepare_data
from astra_ds.data.readers import read_dataset
from astra_ds.data.sources import group_key
from astra_ds.data.tokens import tokenize
from astra_ds.encoder.encoder import build_tokenizer
from astra_ds.errors import DataError
from astra_ds.launch import TASK_VARIABLES
from conftest import REPO
from faults import Injector, crash, sites

SETTINGS = ["encoder.model=tiny-random", "data.max_len=16", "siamese.label_max_len=8", "data.validation_fraction=0.2"]


def _cfg(data: Path):
    return load_config(None, [*SETTINGS, f"data.path={data}"])


def _make_tokenizer(cfg):
    return functools.partial(build_tokenizer, cfg.encoder)


def _tokenizer(data: Path):
    return _make_tokenizer(_cfg(data))


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _part(directory: Path, part: str) -> dict[str, np.ndarray]:
    """The arrays of a part, its units' one after another (offsets made global)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    arrays: dict[str, list] = {}
    for unit in manifest["splits"][part]["units"]:
        for name in ("tokens", "token_offsets", "labels", "label_offsets"):
            path = directory / UNITS / unit["name"] / f"{part}.{name}.npy"
            if path.is_file():
                array = np.load(path).astype(np.int64)
                if name.endswith("offsets"):
                    base = arrays[name][-1][-1] if arrays.get(name) else 0
                    array = (array + base)[0 if not arrays.get(name) else 1:]
                arrays.setdefault(name, []).append(array)
    return {name: np.concatenate(parts) for name, parts in arrays.items()}


def _assert_same_parts(directory: Path, expected: Path) -> None:
    """Each part of `directory` holds the rows of `expected`'s, whatever the units they are cut into."""
    for part in ("train", "validation", "test", "labels"):
        arrays, reference = _part(directory, part), _part(expected, part)
        assert all(np.array_equal(arrays[name], reference[name]) for name in reference), part


@pytest.fixture(scope="module")
def prepared(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "one_worker"
    assert prepare(_cfg(synth_dir), out, _tokenizer(synth_dir), unit_rows=100, progress=False)
    return out


def test_the_arrays_hold_the_token_ids_labels_and_counts_of_the_dataset_read_whole(prepared, synth_dir):
    cfg = _cfg(synth_dir)
    dataset, tokenizer = read_dataset(synth_dir), build_tokenizer(cfg.encoder)
    held = validation_mask(np.arange(len(dataset.train.texts)), 0.2, cfg.train.seed)
    assert 0.1 < held.mean() < 0.3
    expected = {"train": (dataset.train.texts, dataset.train.labels, ~held, 16),
                "validation": (dataset.train.texts, dataset.train.labels, held, 16),
                "test": (dataset.test.texts, dataset.test.labels, np.ones(len(dataset.test.texts), bool), 16),
                "labels": (dataset.label_texts, None, np.ones(dataset.num_labels, bool), 8)}
    for part, (texts, labels, rows, max_len) in expected.items():
        arrays = _part(prepared, part)
        reference = tokenize([t for t, keep in zip(texts, rows) if keep], tokenizer, max_len)
        offsets = arrays["token_offsets"]
        assert np.array_equal(np.diff(offsets), reference.lengths)
        for i in range(len(reference.lengths)):
            assert np.array_equal(arrays["tokens"][offsets[i]:offsets[i + 1]], reference.ids[i, :reference.lengths[i]])
        if labels is not None:
            csr = labels[np.flatnonzero(rows)]
            assert np.array_equal(arrays["label_offsets"], csr.indptr) and np.array_equal(arrays["labels"], csr.indices)
    names = PreparedDirectory(prepared).part("labels").texts()
    assert list(names) == dataset.label_texts and names[7] == dataset.label_texts[7]
    assert names[-1] == dataset.label_texts[-1] and names[2:5] == dataset.label_texts[2:5]
    counts = np.load(prepared / "label_counts.npy")
    assert np.array_equal(counts, np.asarray(dataset.train.labels[np.flatnonzero(~held)].sum(axis=0)).ravel())
    manifest = json.loads((prepared / MANIFEST).read_text())
    assert manifest["splits"]["validation"]["rows"] == held.sum()
    assert manifest["settings"]["token_dtype"] == "uint16"  # a 30,522-token vocabulary


@pytest.mark.parametrize("model", ["tiny-random", "all-MiniLM-L6-v2"])
def test_the_batch_encoder_gives_the_ids_of_the_tokenizer_s_own_call(model):
    tokenizer = build_tokenizer(load_config(None, [f"encoder.model={model}"]).encoder)
    texts = ["a", "Extreme classification of TITLES", "naïve café – ünïcödé 東京 🙂", "word " * 40, "\ufffd x",
             "  padded  spaces  ", "tab\tand\nnewline"]
    tokenizer(["warm the wrapper's own state"], padding="max_length", max_length=12)  # left set on its backend
    for max_len in (4, 16, 64):
        assert encode(tokenizer, texts, max_len) == tokenizer(texts, max_length=max_len, truncation=True)["input_ids"]
    assert encode(tokenizer, [], 8) == []
    expected = tokenizer(texts, max_length=16, truncation=True)["input_ids"]
    for chunk in (1, 3, 100):  # a unit is encoded a chunk of texts at a time
        tokens, lengths = _encoded(tokenizer, texts, 16, np.uint16, chunk=chunk)
        assert lengths.tolist() == [len(ids) for ids in expected]
        assert tokens.tolist() == [i for ids in expected for i in ids] and tokens.dtype == np.uint16


@pytest.mark.slow
def test_two_workers_parts_or_other_units_prepare_the_same_bytes(prepared, synth_dir, tmp_path):
    cfg = _cfg(synth_dir)
    assert prepare(cfg, tmp_path / "two_workers", _make_tokenizer(cfg), workers=2, unit_rows=100, progress=False)
    assert _files(tmp_path / "two_workers") == _files(prepared)
    assert not prepare(cfg, tmp_path / "parts", _make_tokenizer(cfg), part=(1, 2), unit_rows=100, progress=False)
    assert not (tmp_path / "parts" / MANIFEST).exists()  # part 0 is still to come
    assert prepare(cfg, tmp_path / "parts", _make_tokenizer(cfg), part=(0, 2), unit_rows=100, progress=False)
    assert _files(tmp_path / "parts") == _files(prepared)
    assert prepare(cfg, tmp_path / "other_units", _make_tokenizer(cfg), unit_rows=37, progress=False)
    _assert_same_parts(tmp_path / "other_units", prepared)  # the validation rows are chosen by row, not by unit


def test_tasks_of_mpirun_take_their_parts_from_the_launcher(prepared, synth_dir, tmp_path, capsys, monkeypatch):
    args = ["data", "prepare", "--out", str(tmp_path / "mpi"), "--unit-rows", "100", "--part", "auto",
            *[a for s in [*SETTINGS, f"data.path={synth_dir}"] for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | {"PYTHONPATH": str(REPO)}
    result = subprocess.run(["mpirun", "-np", "2", sys.executable, "-m", "astra_ds", *args], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    parts = [(int(units), int(mine)) for units, mine in re.findall(r"(\d+) units of 100 rows, (\d+) for this part",
                                                                  result.stderr)]
    assert len(parts) == 2 and parts[0][0] == parts[1][0] == parts[0][1] + parts[1][1]  # each task its half
    assert _files(tmp_path / "mpi") == _files(prepared)
    for rank, size in TASK_VARIABLES:
        monkeypatch.delenv(rank, raising=False)
        monkeypatch.delenv(size, raising=False)
    assert main(["data", "prepare", "--out", str(tmp_path / "alone"), "--part", "auto", "--set",
                 f"data.path={synth_dir}"]) == 2
    err = capsys.readouterr().err
    assert "--part auto takes the part from a launcher's environment, and there is none here" in err
    assert err.count("\n") == 1


def _json_lines(synth_dir: Path, out: Path, groups: int | None = None) -> Path:
    """The synthetic dataset in the JSON-lines layout, uncompressed; with `groups`, query i of group i % groups."""
    from astra_ds.data.convert import write_xc_json

    out.mkdir()
    write_xc_json(read_dataset(synth_dir), out)
    for name in ("trn.json", "tst.json", "lbl.json"):
        with gzip.open(out / f"{name}.gz", "rt") as f:
            records = [json.loads(line) for line in f]
        if groups and name == "trn.json":
            records = [record | {"group": f"g{i % groups}"} for i, record in enumerate(records)]
        (out / name).write_text("".join(json.dumps(record) + "\n" for record in records))
        (out / f"{name}.gz").unlink()
    return out


def test_json_lines_are_read_from_the_middle_into_the_arrays_of_the_raw_text_layout(prepared, synth_dir, tmp_path):
    data = _json_lines(synth_dir, tmp_path / "json")
    assert prepare(_cfg(data), tmp_path / "prepared", _tokenizer(data), unit_rows=100, progress=False)
    _assert_same_parts(tmp_path / "prepared", prepared)


def test_queries_of_a_group_fall_on_one_side_of_the_validation_split(synth_dir, tmp_path):
    data = _json_lines(synth_dir, tmp_path / "json", groups=40)
    assert prepare(_cfg(data), tmp_path / "prepared", _tokenizer(data), unit_rows=100, progress=False)
    dataset, tokenizer = read_dataset(synth_dir), build_tokenizer(_cfg(data).encoder)
    held_groups = validation_mask(np.array([group_key(f"g{g}") for g in range(40)], np.uint64), 0.2, 0)
    assert 0 < held_groups.sum() < 40
    held = held_groups[np.arange(len(dataset.train.texts)) % 40]
    validation = _part(tmp_path / "prepared", "validation")
    reference = tokenize([t for t, h in zip(dataset.train.texts, held) if h], tokenizer, 16)
    assert np.array_equal(np.diff(validation["token_offsets"]), reference.lengths)
    assert np.array_equal(validation["label_offsets"], dataset.train.labels[np.flatnonzero(held)].indptr)


def test_rows_of_one_set_of_positives_fall_on_one_side_with_validation_group_labels(synth_dir, tmp_path):
    cfg = load_config(None, [*SETTINGS, f"data.path={synth_dir}", "data.validation_group=labels"])
    assert prepare(cfg, tmp_path / "prepared", _make_tokenizer(cfg), unit_rows=100, progress=False)
    labels = read_dataset(synth_dir).train.labels
    label_sets = [",".join(map(str, sorted(labels[i].indices))) for i in range(labels.shape[0])]
    held = validation_mask(np.array([group_key(key) for key in label_sets], np.uint64), 0.2, 0)  # by hand
    shared = {key for key in label_sets if label_sets.count(key) > 1}
    assert len(shared) > 5  # sets of positives that several queries have
    validation = _part(tmp_path / "prepared", "validation")
    assert np.array_equal(validation["label_offsets"], labels[np.flatnonzero(held)].indptr)
    assert np.array_equal(validation["labels"], labels[np.flatnonzero(held)].indices)
    for key in shared:  # never on both sides
        assert len({bool(h) for h, k in zip(held, label_sets) if k == key}) == 1
    row_held = validation_mask(np.arange(labels.shape[0], dtype=np.uint64), 0.2, 0)
    assert any(len({bool(h) for h, k in zip(row_held, label_sets) if k == key}) == 2 for key in shared)


def _arrow_table(columns: dict):
    import pyarrow as pa

    return pa.table(columns)


def _parquet(synth_dir: Path, out: Path, row_group_size: int) -> Path:
    """The synthetic dataset in the Parquet layout, in row groups of `row_group_size`."""
    import pyarrow.parquet as pq

    dataset = read_dataset(synth_dir)
    out.mkdir()
    for split, name in (("train", "trn"), ("test", "tst")):
        part = getattr(dataset, split)
        targets = [part.labels.indices[part.labels.indptr[i]:part.labels.indptr[i + 1]].tolist()
                   for i in range(len(part.texts))]
        pq.write_table(_arrow_table({"title": part.texts, "target_ind": targets}), out / f"{name}.parquet",
                       row_group_size=row_group_size)
    pq.write_table(_arrow_table({"title": dataset.label_texts}), out / "lbl.parquet", row_group_size=row_group_size)
    return out


def test_parquet_is_read_by_row_groups_into_the_arrays_of_the_raw_text_layout_and_read_whole_alike(
        prepared, synth_dir, tmp_path):
    data = _parquet(synth_dir, tmp_path / "parquet", row_group_size=64)  # units of 100 rows span row groups
    assert prepare(_cfg(data), tmp_path / "prepared", _tokenizer(data), unit_rows=100, progress=False)
    _assert_same_parts(tmp_path / "prepared", prepared)
    whole, reference = read_dataset(data), read_dataset(synth_dir)
    assert whole.train.texts == reference.train.texts and whole.label_texts == reference.label_texts
    assert (whole.test.labels != reference.test.labels).nnz == 0


def test_the_test_split_s_filter_file_is_prepared_and_evaluated_as_from_the_files(synth_dir, tmp_path, caplog):
    data = shutil.copytree(synth_dir, tmp_path / "data")
    (data / "filter_labels_test.txt").write_text("0 3\n0 7\n5 1\n127 49\n")
    cfg = _cfg(data)
    assert prepare(cfg, tmp_path / "prepared", _tokenizer(data), unit_rows=100, progress=False)
    tokenizer = build_tokenizer(cfg.encoder)
    from_files = read_dataset(data).test_filter
    cfg.data.path = str(tmp_path / "prepared")
    prepared = prepare_data(cfg, tokenizer).test.filter
    assert prepared.nnz == 4 and (prepared != from_files).nnz == 0 and prepared.shape == from_files.shape
    (tmp_path / "prepared" / "test_filter.npz").write_bytes(b"damaged")
    with pytest.raises(DataError, match="test_filter.npz of the prepared data is missing or damaged"):
        prepare_data(cfg, tokenizer)

    lines = (data / "tst_X_Y.txt").read_text().split("\n")
    lines[3] = "3:1 999:1"  # a malformed test row, skipped: the filter's rows would no longer be the source's
    (data / "tst_X_Y.txt").write_text("\n".join(lines))
    skipping = load_config(None, [*SETTINGS, f"data.path={data}", "data.on_bad_row=skip"])
    assert prepare(skipping, tmp_path / "skipped", _tokenizer(data), unit_rows=100, progress=False)
    assert "filter_labels_test.txt is left out of the prepared data: 1 test rows were skipped" in caplog.text
    assert json.loads((tmp_path / "skipped" / MANIFEST).read_text())["test_filter"] is None


@pytest.mark.parametrize("layout", ["raw_text", "json", "parquet"])
def test_a_malformed_row_names_its_file_and_line_or_is_skipped_and_counted(layout, synth_dir, tmp_path, capsys):
    if layout == "raw_text":
        data = shutil.copytree(synth_dir, tmp_path / "data")
        path, line = data / "trn_X_Y.txt", 8
        lines = path.read_text().split("\n")
        lines[line - 1] = "3:1 999:1"
        message = f"{path}:{line}: label id 999 out of range [0, 50)"
    elif layout == "json":
        data = _json_lines(synth_dir, tmp_path / "data")
        path, line = data / "trn.json", 7
        lines = path.read_text().split("\n")
        lines[line - 1] = '{"title": "no end"'
        message = f"{path}:{line}: not a JSON object"
    else:
        import pyarrow.parquet as pq

        data = _parquet(synth_dir, tmp_path / "data", row_group_size=4)
        path = data / "trn.parquet"
        table = pq.read_table(path).to_pydict()
        table["target_ind"][6] = [3, 999]
        pq.write_table(_arrow_table(table), path, row_group_size=4)
        message = f"{path}: row 6 (row group 1): label id 999 out of range [0, 50)"
    if layout != "parquet":
        path.write_text("\n".join(lines))
    args = ["data", "prepare", "--unit-rows", "100", *[a for s in [*SETTINGS, f"data.path={data}"]
                                                       for a in ("--set", s)]]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"astra-ds: error: {message}") and err.count("\n") == 1, err
    assert main([*args, "--set", "data.on_bad_row=skip", "--out", str(tmp_path / "skipped")]) == 0
    manifest = json.loads((tmp_path / "skipped" / MANIFEST).read_text())
    assert manifest["skipped_rows"] == {"train": 1, "test": 0}
    rows = read_dataset(synth_dir).train.labels.shape[0]
    kept = np.delete(np.arange(rows), 6)  # row 6: line 8 of trn_X_Y.txt (after its header), line 7 of trn.json
    held = validation_mask(kept.astype(np.uint64), 0.2, 0)  # the other rows keep their numbers
    assert manifest["splits"]["train"]["rows"] == (~held).sum()
    assert manifest["splits"]["validation"]["rows"] == held.sum()
    assert main(["data", "stats", str(tmp_path / "skipped")]) == 0
    assert "malformed rows left out (data.on_bad_row=skip): 1 train" in capsys.readouterr().out


def test_a_directory_prepared_from_other_settings_or_sources_is_refused(prepared, synth_dir, tmp_path, capsys):
    copy = shutil.copytree(prepared, tmp_path / "copy")
    other = [a for s in [*SETTINGS[:-1], "data.validation_fraction=0.3", f"data.path={synth_dir}"] for a in ("--set", s)]
    for finished in (True, False):  # unfinished: a rerun would resume it
        if not finished:
            (copy / MANIFEST).unlink()
        assert main(["data", "prepare", "--out", str(copy), "--unit-rows", "100", *other]) == 2
        err = capsys.readouterr().err
        assert err.startswith("astra-ds: error: ") and "other settings" in err and err.count("\n") == 1
    assert main(["data", "prepare", "--out", str(tmp_path / "new"), "--set", f"data.path={tmp_path / 'none'}"]) == 2
    assert capsys.readouterr().err == (f"astra-ds: error: data.path {tmp_path / 'none'} is not a directory (a dataset "
                                       "is a directory of files)\n")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "crash"])
def test_a_fault_at_each_write_point_then_a_rerun_ends_as_an_uninterrupted_preparation(kind, prepared, synth_dir,
                                                                                        tmp_path, capsys):
    args = ["data", "prepare", "--unit-rows", "100", *[a for s in [*SETTINGS, f"data.path={synth_dir}"]
                                                       for a in ("--set", s)]]
    with Injector(roots=(tmp_path / "count",)) as counting:
        assert main([*args, "--out", str(tmp_path / "count")]) == 0
    for case, at in enumerate(sites(counting.points)):
        out = tmp_path / str(case)
        capsys.readouterr()
        if kind == "crash":
            crash(lambda: main([*args, "--out", str(out)]), out, at)
        else:
            with Injector("full", at, roots=(out,)):
                assert main([*args, "--out", str(out)]) == 2, at
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith("astra-ds: error: ") and "the disk is full" in err[-1], err[-3:]
        assert main([*args, "--out", str(out)]) == 0, at
        assert _files(out) == _files(prepared), at


def test_a_batch_gathered_across_units_equals_the_dataset_s_rows(prepared, synth_dir):
    from astra_ds.data.prepared import PreparedDirectory

    cfg = _cfg(synth_dir)
    dataset, tokenizer = read_dataset(synth_dir), build_tokenizer(cfg.encoder)
    kept = np.flatnonzero(~validation_mask(np.arange(len(dataset.train.texts)), 0.2, cfg.train.seed))
    reference = tokenize([dataset.train.texts[i] for i in kept], tokenizer, 16)
    data = PreparedDirectory(prepared)
    train = data.part("train", pad_id=tokenizer.pad_token_id)
    assert len(train) == len(kept) and len(train.unit_names) == 6
    rows = np.random.default_rng(0).permutation(len(kept))[:64]  # from every unit, in no order
    for got, expected in zip(train.batch(rows), reference.batch(rows)):
        assert torch.equal(got, expected)
    assert np.array_equal(train.lengths_of(rows), reference.lengths[rows])
    assert (train.labels(rows) != dataset.train.labels[kept[rows]]).nnz == 0
    assert np.array_equal(data.label_counts, np.asarray(dataset.train.labels[kept].sum(axis=0)).ravel())


def test_stats_and_validate_read_a_prepared_directory(prepared, synth_dir, tmp_path, capsys):
    dataset = read_dataset(synth_dir)
    kept = ~validation_mask(np.arange(len(dataset.train.texts)), 0.2, 0)
    train = dataset.train.labels[kept]
    never_seen = int((np.asarray(train.sum(axis=0)).ravel() == 0).sum())
    assert main(["data", "stats", str(prepared)]) == 0
    out = capsys.readouterr().out
    assert f"prepared dataset {prepared}: 50 labels, label texts: yes" in out
    assert f"  train: {kept.sum()} queries, {train.nnz} positives" in out and f"labels never seen {never_seen}" in out
    assert f"  validation: {(~kept).sum()} queries" in out and "  test: 128 queries" in out

    assert main(["data", "validate", str(prepared)]) == 0
    assert "every array of its" in capsys.readouterr().out
    damaged = shutil.copytree(prepared, tmp_path / "damaged")
    array = next((damaged / UNITS).iterdir()) / "train.labels.npy"
    np.save(array, np.load(array)[::-1].copy())
    assert main(["data", "validate", str(damaged)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "1 of the arrays of" in error and array.name in error
    assert "prepare it again" in error
