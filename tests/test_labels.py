"""Labels that change on a finished run (labels/change.py): added labels are found by exact and ANN prediction and
score as the map of their text's embedding says, scaled as a dense reference chooses on the training queries; retired labels never come out; the changed run's digests verify and its
version moves; an interrupted change is refused until `labels finish`; bad input ends in one line. A training run
that starts from a finished run on a grown label set (training/from_run.py) takes the run's rows and optimizer state
by name, starts the new rows from their texts mapped like trained rows, and resumes like any other."""

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

import astra_ds
from astra_ds.cli.main import main
from astra_ds.data.convert import with_labels, write_raw_text
from astra_ds.data.readers import read_dataset
from astra_ds.errors import DataError, UserError
from astra_ds.training.from_run import match_labels
from astra_ds.labels import change as labels_module
from astra_ds.labels import row_scale as row_scale_module
from astra_ds.labels.label_file import read_label_file
from astra_ds.rundir.card import ModelCard
from astra_ds.rundir.run_dir import RunDir
from astra_ds.labels.row_scale import calibrated_row_scale, training_queries
from astra_ds.table.store import open_table
from conftest import TINY_RUN, run_main

NEW = ["zeta w401 w402", "w403 w404 w405 w406", "w407"]


@pytest.fixture
def run_dir(finished_run, tmp_path):
    """A copy of the finished run (dual scoring, normalised rows, an HNSW serving index)."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _label_file(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _stored_rows(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(open_table(path)["rows"][:])).double()


def _ridge_reference(texts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The map text embedding -> row as the least-squares solution of [E; I] A = [W; 0] (ridge 1)."""
    d = texts.shape[1]
    return torch.linalg.lstsq(torch.cat([texts, torch.eye(d, dtype=texts.dtype)]),
                              torch.cat([rows, torch.zeros(d, rows.shape[1], dtype=rows.dtype)])).solution


def test_added_labels_are_found_and_score_as_the_map_of_their_texts_embedding_says(run_dir, tmp_path, capsys):
    before = astra_ds.load(run_dir)
    version = before.description()["version"]
    trained_map = _ridge_reference(_stored_rows(run_dir / "label_embeddings"), _stored_rows(run_dir / "table"))
    file = _label_file(tmp_path / "new.txt", [NEW[0], f"fresh\t{NEW[1]}", json.dumps({"text": NEW[2], "name": "n3"})])
    assert main(["labels", "add", "--run-dir", str(run_dir), "--labels", str(file), "--row-scale", "0.6"]) == 0
    assert capsys.readouterr().out.strip() == f"3 labels added to {run_dir}: ids 50-52"
    RunDir(run_dir).read_card()  # the digests of the changed run verify
    model = astra_ds.load(run_dir)
    assert model.num_labels == 53 and model.description()["version"] != version
    assert model.label_names[50:] == [NEW[0], "fresh", "n3"]
    # the row is e A (A fitted on the 50 trained labels), its scoring vector (normalised rows) s eA/|eA| + 0.5 e
    embeddings = torch.from_numpy(model.encode(NEW)).double()
    rows = embeddings @ trained_map
    assert model.card.row_scales == [[50, 53, 0.6]]
    vectors = 0.6 * rows / rows.norm(dim=1, keepdim=True) + 0.5 * embeddings
    torch.testing.assert_close(_stored_rows(run_dir / "table")[50:], rows, rtol=1e-4, atol=1e-5)
    queries = torch.from_numpy(model.encode([*NEW, "w5 w401 w407", "w12 w403"]))
    exact_scores, exact_ids = model.topk(queries, 53, exact=True)
    ann_scores, ann_ids = model.topk(queries, 53, exact=False)  # the serving index holds them too
    for scores, ids in ((exact_scores, exact_ids), (ann_scores, ann_ids)):
        for q in range(len(queries)):
            for new in range(3):
                position = ids[q].tolist().index(50 + new)
                assert scores[q, position].item() == pytest.approx((queries[q].double() @ vectors[new]).item(),
                                                                   abs=1e-5)
    assert model.index is not None and model.index.index.ntotal == 53
    np.testing.assert_array_equal(model.predict(NEW, k=5, exact=False).ids, model.predict(NEW, k=5, exact=True).ids)
    assert main(["index", "--run-dir", str(run_dir)]) == 0  # a rebuilt index scales them too
    rebuilt_scores, rebuilt_ids = astra_ds.load(run_dir).topk(queries, 53)
    np.testing.assert_array_equal(rebuilt_ids, ann_ids)
    torch.testing.assert_close(rebuilt_scores, ann_scores)
    table = open_table(run_dir / "table")
    for name, array in table.arrays():
        assert array.shape[0] == 53
    for _, group in table.groups():
        for _, array in group.arrays():  # optimizer state: new rows start fresh
            assert array.shape[0] == 53 and not np.asarray(array[50:]).any()
    # predictions of old labels are unchanged where no new label outranks them
    old = before.predict(["w1 w2 w3"], k=5, exact=True)
    new = model.predict(["w1 w2 w3"], k=5, exact=True)
    assert [i for i in new.ids[0] if i < 50] == old.ids[0][:len([i for i in new.ids[0] if i < 50])].tolist()


def test_a_run_without_stored_label_text_embeddings_fits_the_map_on_its_names_embedded(run_dir):
    """The stored label-text embeddings are the label names through the final encoder: fitting the map on either
    gives the same new rows."""
    model = astra_ds.load(run_dir)
    embeddings = model.embed_label_texts(NEW)
    stored = labels_module._rows_from_texts(RunDir(run_dir), 50, embeddings, model.embed_label_texts)
    shutil.rmtree(run_dir / "label_embeddings")
    embedded = labels_module._rows_from_texts(RunDir(run_dir), 50, embeddings, model.embed_label_texts)
    torch.testing.assert_close(embedded, stored, rtol=1e-3, atol=1e-4)
    (run_dir / "label_names.txt").unlink()  # nothing to fit on: the rows are the text embeddings
    assert torch.equal(labels_module._rows_from_texts(RunDir(run_dir), 50, embeddings, model.embed_label_texts), embeddings)


def _dense_row_scale(queries, old_vectors, rows, text_part, allowed) -> float:
    """The largest scale in steps of 0.02 at which the added labels, scored beside the old ones by all their
    vectors at once, are the top-1 of at most `allowed` queries."""
    chosen = 0.0
    for scale in np.linspace(0, 1, 51):
        new_vectors = scale * rows / rows.norm(dim=1, keepdim=True) + text_part
        top1 = (queries @ torch.cat([old_vectors, new_vectors]).T).argmax(dim=1)
        if (top1 >= len(old_vectors)).sum() <= allowed:
            chosen = scale
    return chosen


def test_the_row_scale_is_the_largest_at_which_added_labels_take_at_most_their_share_of_top_1s():
    generator = torch.Generator().manual_seed(0)
    hub = torch.randn(16, generator=generator, dtype=torch.float64)
    queries = F.normalize(torch.randn(400, 16, generator=generator, dtype=torch.float64) + hub, dim=1)
    old_vectors = F.normalize(torch.randn(200, 16, generator=generator, dtype=torch.float64), dim=1)
    rows = torch.randn(20, 16, generator=generator, dtype=torch.float64) + 2 * hub  # rows near the queries' hub
    embeddings = F.normalize(torch.randn(20, 16, generator=generator, dtype=torch.float64), dim=1)
    card = ModelCard(0, 200, 16, "tiny-random", "mean", 8, normalize_rows=True, label_text_weight=0.5, log_scale=0.0,
                     bias=0.0, dataset="")
    best_old = (queries @ old_vectors.T).amax(dim=1)
    expected = _dense_row_scale(queries, old_vectors, rows, 0.5 * embeddings, allowed=20 / 220 * 400)
    assert 0 < expected < 1  # the case the scale is for: unscaled, the added rows take more than their share
    assert calibrated_row_scale(queries, best_old, rows, embeddings, card, 200) == pytest.approx(expected)


def test_labels_add_scales_the_new_rows_as_a_dense_reference_chooses_on_the_training_queries(
        run_dir, tmp_path, monkeypatch, caplog):
    model = astra_ds.load(run_dir)
    queries = model.encode_queries(training_queries(model.cfg, model.card, 50)).double()
    old_vectors = model.scoring_rows().block_rows(0, 50).double()
    embeddings = model.embed_label_texts(NEW).double()
    rows = embeddings @ _ridge_reference(_stored_rows(run_dir / "label_embeddings"), _stored_rows(run_dir / "table"))
    expected = _dense_row_scale(queries, old_vectors, rows, 0.5 * embeddings, allowed=max(1, 3 / 53 * len(queries)))
    model.add_labels(NEW)
    assert model.card.row_scales == [[50, 53, pytest.approx(expected)]]
    model.add_labels(["w460 w461"], row_scale=0.5)  # given: taken as is, the first addition's scale kept
    assert model.card.row_scales == [[50, 53, pytest.approx(expected)], [53, 54, 0.5]]
    monkeypatch.setattr(row_scale_module, "read_dataset", lambda *args: (_ for _ in ()).throw(
        DataError("dataset directory not found: gone")))
    model.add_labels(["w470 w471"])  # the training data is gone: not scaled, said so
    assert model.card.row_scales[-1] == [54, 55, 1.0]
    assert "the run's training data cannot be read (dataset directory not found: gone)" in caplog.text


def test_retired_labels_never_come_out_and_restore_brings_them_back(run_dir, capsys):
    model = astra_ds.load(run_dir)
    texts = ["w1 w2", "w33 w7 w9", "w100"]
    top = model.predict(texts, k=3, exact=True).ids
    retired = sorted({int(top[0, 0]), int(top[1, 0]), 7})
    assert main(["labels", "retire", "--run-dir", str(run_dir), "--ids", *map(str, retired)]) == 0
    assert f"{len(retired)} labels retired" in capsys.readouterr().out
    model = astra_ds.load(run_dir)
    for exact in (True, False):
        ids = model.predict(texts, k=50 - len(retired), exact=exact).ids
        assert not set(ids.ravel().tolist()) & set(retired)
        if exact:
            assert sorted(ids[0].tolist()) == sorted(set(range(50)) - set(retired))
    assert main(["predict", "--run-dir", str(run_dir), "--text", "w1", "--top-k", "50"]) == 2
    assert f"exceeds the model's {50 - len(retired)} labels" in capsys.readouterr().err
    assert main(["labels", "restore", "--run-dir", str(run_dir), "--ids", str(retired[0])]) == 0
    capsys.readouterr()
    model = astra_ds.load(run_dir)
    np.testing.assert_array_equal(model.retired, retired[1:])
    model.restore_labels(ids=retired[1:])
    assert len(model.retired) == 0
    np.testing.assert_array_equal(model.predict(texts, k=3, exact=True).ids, top)


def test_the_python_api_adds_and_retires_labels_on_the_loaded_model(run_dir):
    model = astra_ds.load(run_dir)
    ids = model.add_labels(["w450 w451"], names=["api label"])
    assert list(ids) == [50] and model.num_labels == 51
    assert "api label" in model.predict(["w450 w451"], k=51).names[0]
    model.retire_labels(names=["api label"])
    assert 50 not in model.predict(["w450 w451"], k=50).ids


def test_an_interrupted_change_is_refused_until_finished(run_dir, finished_run, tmp_path, monkeypatch, capsys):
    file = _label_file(tmp_path / "new.txt", NEW)
    publish = labels_module._publish

    def crash(path, known):
        raise KeyboardInterrupt

    monkeypatch.setattr(labels_module, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        model = astra_ds.load(run_dir)
        labels_module.add_labels(RunDir(run_dir), read_label_file(file), model.embed_label_texts,
                                 model.encode_queries)
    monkeypatch.setattr(labels_module, "_publish", publish)
    assert main(["predict", "--run-dir", str(run_dir), "--text", "w1"]) == 2
    assert capsys.readouterr().err.strip() == (f"astra-ds: error: {run_dir} is changing its labels, or a change was "
                                               f"interrupted: `astra-ds labels finish --run-dir {run_dir}` finishes it")
    assert main(["labels", "finish", "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    model = astra_ds.load(run_dir)
    assert model.num_labels == 53 and model.index.index.ntotal == 53  # added once, not twice
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(finished_run, uninterrupted)
    astra_ds.load(uninterrupted).add_labels(NEW)
    torch.testing.assert_close(_stored_rows(run_dir / "table"), _stored_rows(uninterrupted / "table"))
    assert model.card.row_scales == astra_ds.load(uninterrupted).card.row_scales
    for exact in (True, False):
        np.testing.assert_array_equal(model.predict(NEW, k=5, exact=exact).ids,
                                      astra_ds.load(uninterrupted).predict(NEW, k=5, exact=exact).ids)


@pytest.mark.parametrize("lines, command, message", [
    ([], "add", "holds no label"),
    (["label one", "label one"], "add", "'label one' is twice in the new labels"),
    (["{\"name\": \"no text\"}"], "add", 'line 1: not a JSON object with a "text"'),
    (None, "add", "line 2: not UTF-8 (byte 3: "),
    (None, "retire --ids 50", "label id 50 is out of range: the model has ids 0-49"),
    (None, "retire --names nothing-like-it", "no label is named 'nothing-like-it'"),
    (None, "retire --ids " + " ".join(map(str, range(50))), "would retire all 50 labels"),
    (["fine"], "add --row-scale -1", "the row scale must be a number >= 0, not -1.0"),
])
def test_bad_label_input_ends_in_one_line(run_dir, tmp_path, capsys, lines, command, message):
    args = ["labels", *command.split(), "--run-dir", str(run_dir)]
    if command.startswith("add"):
        file = tmp_path / "new.txt"
        if lines is None:
            file.write_bytes("fine\n".encode() + "ca\xe9f\n".encode("latin-1"))
        else:
            _label_file(file, lines)
        args += ["--labels", str(file)]
    manifest = (run_dir / "manifest.json").read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("astra-ds: error: ") and message in err and "\n" not in err
    assert (run_dir / "manifest.json").read_bytes() == manifest  # nothing changed


def test_a_change_reads_only_the_files_it_wrote_and_the_new_version_verifies(run_dir, tmp_path, monkeypatch):
    from astra_ds import digests

    model = astra_ds.load(run_dir)  # verified, remembered
    reads = []
    real_digest = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda path: (reads.append(path.name), real_digest(path))[1])
    model.retire_labels(ids=[3])  # writes retired_labels.json, then reloads the run
    assert set(reads) - {"manifest.json"} == {"retired_labels.json"}
    monkeypatch.undo()
    digests_now = json.loads((run_dir / "manifest.json").read_text())
    assert digests_now == {name: digests.file_digest(run_dir / name) for name in digests_now}


def test_a_name_the_run_has_already_is_refused(run_dir, tmp_path, capsys):
    existing = (run_dir / "label_names.txt").read_text().split("\n")[3]
    file = _label_file(tmp_path / "new.txt", [f"{existing}\tsome text"])
    assert main(["labels", "add", "--run-dir", str(run_dir), "--labels", str(file)]) == 2
    assert f"label {existing!r} exists already (id 3)" in capsys.readouterr().err


# ---- training on from a finished run, the label set grown ---------------------------------------------------------

# the finished run's encoder settings; the classifier stage alone trains the rows
GROWN_RUN = [*TINY_RUN, "encoder.dim=16", "negatives.strategy=uniform", "batching.mode=random", "train.epochs=0",
             "classifier.epochs=2", "classifier.batch_size=64", "table.init=label_text", "train.log_every=1"]


def _grown_data(synth_dir, out, order: np.ndarray, new_texts: list[str]):
    """The run's dataset with its labels in `order`, then `new_texts` as new labels, each relevant to a few queries."""
    dataset = with_labels(read_dataset(synth_dir), order)
    rng = np.random.default_rng(0)

    def with_new(split):
        extra = sp.random(len(split.texts), len(new_texts), density=0.05, random_state=rng, format="csr")
        extra.data[:] = 1
        return replace(split, labels=sp.hstack([split.labels, extra], format="csr"))

    grown = replace(dataset, train=with_new(dataset.train), test=with_new(dataset.test),
                    num_labels=dataset.num_labels + len(new_texts), label_texts=dataset.label_texts + new_texts)
    out.mkdir()
    write_raw_text(grown, out)
    return out


def _grown_sets(data, data_cache, out, *more):
    return [arg for setting in [*GROWN_RUN, f"data.path={data}", f"data.cache_dir={data_cache}", f"out_dir={out}",
                                *more] for arg in ("--set", setting)]


def test_a_run_from_a_finished_run_takes_its_rows_by_name_and_maps_new_ones_from_their_texts(
        finished_run, synth_dir, data_cache, tmp_path):
    from astra_ds.config import load_config
    from astra_ds.dist import init_distributed
    from astra_ds.training.trainer import Trainer

    order = np.random.default_rng(1).permutation(50)
    data = _grown_data(synth_dir, tmp_path / "data", order, NEW)
    cfg = load_config(None, [*GROWN_RUN, f"data.path={data}", f"data.cache_dir={data_cache}",
                             f"out_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, init_distributed(), progress=False, init_from=str(finished_run))
    trainer.parts.initialize_rows()
    table, stored = trainer.table, open_table(finished_run / "table")
    np.testing.assert_array_equal(table.rows[:50].numpy(), np.asarray(stored["rows"][:])[order])
    np.testing.assert_array_equal(table.optimizer.state["sum"][:50].numpy(), np.asarray(stored["optim/sum"][:])[order])
    assert (table.optimizer.state["sum"][50:] == 0).all()  # new rows: fresh optimizer state
    # new rows: their label-text embeddings through the map fitted on the run's labels
    trained_map = _ridge_reference(_stored_rows(finished_run / "label_embeddings"),
                                   _stored_rows(finished_run / "table"))
    torch.testing.assert_close(table.rows[50:].double(),
                               astra_ds.load(finished_run).embed_label_texts(NEW).double() @ trained_map,
                               rtol=1e-4, atol=1e-5)
    run_weights = torch.load(finished_run / "encoder.pt")
    for name, weight in trainer.engine.module.state_dict().items():
        torch.testing.assert_close(weight, run_weights[name])


@pytest.mark.parametrize("stopped", ["after a checkpoint", "before its first checkpoint"])
def test_a_run_from_a_finished_run_resumes_like_an_uninterrupted_one(finished_run, synth_dir, data_cache, tmp_path,
                                                                    stopped):
    data = _grown_data(synth_dir, tmp_path / "data", np.arange(50)[::-1], NEW)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_main("train", *_grown_sets(data, data_cache, straight, "train.max_steps=6"), "--init-from",
             str(finished_run), "--no-eval")
    run_main("train", *_grown_sets(data, data_cache, resumed, "train.max_steps=3"), "--init-from",
             str(finished_run), "--no-eval")
    if stopped == "before its first checkpoint":  # no checkpoint, no model: it starts again from the run it began from
        shutil.rmtree(resumed / "checkpoints")
        (resumed / "manifest.json").unlink()
    run_main("train", *_grown_sets(data, data_cache, resumed, "train.max_steps=6"), "--resume", "auto", "--no-eval")
    losses = [[r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
              for run in (straight, resumed)]
    assert len(losses[0]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    rows = [np.asarray(open_table(run / "table")["rows"][:]) for run in (straight, resumed)]
    np.testing.assert_allclose(rows[1], rows[0], rtol=1e-5, atol=1e-7)
    assert astra_ds.load(resumed).num_labels == 53


@pytest.mark.parametrize("run_names, names, retired, expected", [
    (["a", "b", "c"], ["c", "new", "a", "b"], [], [2, -1, 0, 1]),
    (["a", "x", "b", "x"], ["x", "b", "x", "a", "y"], [], [1, 2, 3, 0, -1]),  # the same name: matched in order
    (["a", "b", "c"], ["c", "a"], [1], [2, 0]),  # a retired label may be left out
    (None, ["p", "q", "r"], [], [0, 1, 2]),  # no names on one side: by id, the new labels after
    (["a", "b", "c"], ["a", "c"], [], "1 labels of the run are not in this dataset's labels (e.g. 'b')"),
    (["x", "b"], ["x", "x", "b"], [], "label name 'x' names 2 labels of this dataset and 1 of the run"),
    (None, ["p"], [], "the run has 3 labels and this dataset 1"),
])
def test_labels_are_matched_by_name_and_a_missing_or_ambiguous_one_is_refused(run_names, names, retired, expected):
    def match():
        return match_labels(run_names, 3 if run_names is None else len(run_names), names, len(names),
                            np.array(retired, dtype=np.int64)).tolist()

    if isinstance(expected, str):
        with pytest.raises(UserError, match=re.escape(expected)):
            match()
    else:
        assert match() == expected


def test_a_dataset_without_all_the_runs_labels_is_refused_in_one_line(finished_run, synth_dir, data_cache,
                                                                      tmp_path, capsys):
    data = _grown_data(synth_dir, tmp_path / "data", np.arange(49), [])
    assert main(["train", *_grown_sets(data, data_cache, tmp_path / "run"), "--init-from", str(finished_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("astra-ds: error: 1 labels of the run are not in this dataset's labels")
