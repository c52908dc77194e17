"""The inference side of a finished run: predict (CLI and API) against the evaluation's own predictions, the
serving index against exact search, a run directory that travels, the export loaded by sentence-transformers,
results never overwritten, one-line errors."""

import json
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import astra_ds
from astra_ds.cli.main import main
from astra_ds.data.readers import read_dataset
from astra_ds.errors import ConfigError
from astra_ds.table.store import StoredRows
from conftest import TINY_RUN, run_main

# dual scoring and a projection (the export's Dense module), a serving index built at the end of training
INFERENCE_RUN = [*TINY_RUN, "train.epochs=1", "eval.label_text_weight=0.5", "encoder.dim=16",
                 "negatives.strategy=uniform", "batching.mode=random"]


def _sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def finished(synth_dir, data_cache, tmp_path_factory):
    """The run, trained through the Python API (astra_ds.train, which `astra-ds train` calls), and the parts of its
    trainer (trainer, table, engine, sampler) that were still alive when its serving index was built."""
    import gc
    import weakref

    from astra_ds import run as run_module

    held, alive = [], []

    class RecordedTrainer(run_module.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            held.extend(weakref.ref(part) for part in (self, self.table, self.engine, self.sampler))

    def build_serving_index(*args, **kwargs):
        gc.collect()
        alive.extend(type(ref()).__name__ for ref in held if ref() is not None)
        return index_builder(*args, **kwargs)

    index_builder = run_module.build_serving_index
    out = tmp_path_factory.mktemp("inference") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "Trainer", RecordedTrainer)
        patch.setattr(run_module, "build_serving_index", build_serving_index)
        run = astra_ds.train(None, [*INFERENCE_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}",
                                    f"out_dir={out}"])
    assert len(held) == 4
    return run, alive


@pytest.fixture(scope="module")
def run_dir(finished):
    return finished[0].run_dir


def test_train_from_python_returns_the_finished_run_and_lets_the_training_state_go(finished):
    """astra_ds.train trains, saves, evaluates and indexes a run and returns it; the trainer, its table, engine
    and sampler are freed before the serving index is built (at 10^8 labels they would not fit beside it)."""
    run, alive_at_index_build = finished
    assert alive_at_index_build == []
    assert run.step == 16 and run.cfg.eval.label_text_weight == 0.5
    written = json.loads((run.run_dir / "metrics.json").read_text())
    assert run.metrics == {name: written[name] for name in ("astra_ds", "popularity")}
    assert (run.run_dir / "ann" / "index.faiss").is_file() and (run.run_dir / "memory.json").is_file()
    texts = ["toba lebu", "pode gubi kide"]
    np.testing.assert_array_equal(run.load().predict(texts, k=3).ids,
                                  astra_ds.load(run.run_dir).predict(texts, k=3).ids)


def _test_texts(synth_dir) -> list[str]:
    return read_dataset(synth_dir).test.texts


def test_predict_gives_the_evaluation_s_predictions(run_dir, synth_dir, tmp_path):
    """The training's evaluation (exact top-k) and `predict --exact` on the same texts agree: logits in every .npz,
    said in the file."""
    texts = _test_texts(synth_dir)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "predicted.npz"
    run_main("predict", "--run-dir", str(run_dir), "--input", str(tmp_path / "texts.txt"), "--top-k", "5",
             "--exact", "--out", str(out))
    evaluated, predicted = sp.load_npz(run_dir / "predictions.npz"), sp.load_npz(out)
    assert predicted.shape == evaluated.shape == (len(texts), 50)
    np.testing.assert_array_equal(predicted.indices, evaluated.indices)
    np.testing.assert_allclose(predicted.data, evaluated.data, rtol=1e-5, atol=1e-5)
    assert str(np.load(run_dir / "predictions.npz")["score"]) == str(np.load(out)["score"]) == "logit"
    probabilities = astra_ds.load(run_dir).predict(texts, k=5, exact=True).scores
    from_logits = torch.sigmoid(torch.from_numpy(predicted.data)).numpy().reshape(len(texts), 5)  # 5 a row
    np.testing.assert_allclose(np.sort(probabilities, axis=1), np.sort(from_logits, axis=1), rtol=1e-5)


def test_the_api_predicts_probabilities_with_names_and_encodes(run_dir, synth_dir):
    model = astra_ds.load(run_dir)
    texts = _test_texts(synth_dir)[:8]
    exact = model.predict(texts, k=4, exact=True)
    logits = model.predict(texts, k=4, exact=True, logits=True)
    np.testing.assert_allclose(exact.scores, torch.sigmoid(torch.from_numpy(logits.scores)).numpy(), rtol=1e-6)
    assert (np.diff(exact.scores, axis=1) <= 0).all()  # best first
    names = (run_dir / "label_names.txt").read_text().split("\n")
    assert exact.names == [[names[i] for i in row] for row in exact.ids]
    assert names == read_dataset(synth_dir).label_texts
    # logits by hand: scale * <q, w / |w| + 0.5 e> + bias over every label
    queries = torch.from_numpy(model.encode(texts))
    assert torch.allclose(queries.norm(dim=1), torch.ones(8))
    rows, embeddings = StoredRows(run_dir / "table").load(), StoredRows(run_dir / "label_embeddings").load()
    vectors = torch.nn.functional.normalize(rows.rows, dim=1) + 0.5 * embeddings.rows
    card = json.loads((run_dir / "model.json").read_text())
    expected = np.exp(card["log_scale"]) * queries @ vectors.T + card["bias"]
    top = expected.topk(4, dim=1)
    np.testing.assert_array_equal(logits.ids, top.indices.numpy())
    np.testing.assert_allclose(logits.scores, top.values.numpy(), rtol=1e-5, atol=1e-5)


def test_the_serving_index_finds_the_exact_top_k(run_dir, synth_dir, capsys):
    info = json.loads((run_dir / "ann" / "index.json").read_text())
    assert (info["kind"], info["num_labels"], info["dim"], info["label_text_weight"]) == ("hnsw", 50, 16, 0.5)
    model = astra_ds.load(run_dir)
    texts = _test_texts(synth_dir)
    approximate, exact = model.predict(texts, k=5), model.predict(texts, k=5, exact=True)
    np.testing.assert_array_equal(approximate.ids, exact.ids)  # HNSW over 50 rows misses nothing
    np.testing.assert_allclose(approximate.scores, exact.scores, rtol=1e-5)

    capsys.readouterr()
    run_main("eval", "--run-dir", str(run_dir), "--ann")
    assert "ANN recall@5 against exact: 1.0000" in capsys.readouterr().out
    metrics = json.loads((run_dir / "evals" / "1" / "metrics.json").read_text())
    assert metrics["astra_ds"] == metrics["astra_ds (ann)"] == json.loads((run_dir / "metrics.json").read_text())["astra_ds"]
    assert metrics["ann_recall@5"] == 1.0 and metrics["topk"] == "exact and ann"
    assert (metrics["step"], metrics["ks"], metrics["psp_a"], metrics["psp_b"]) == (16, [1, 3, 5], 0.55, 1.5)
    assert metrics["dataset"] == str(synth_dir.resolve())


def test_a_finished_run_is_evaluated_from_python_as_by_the_cli(run_dir, tmp_path):
    """model.evaluate is what `astra-ds eval` runs: the training's own test metrics, exactly, into the directory
    it is given; a search that does not exist is one line."""
    model = astra_ds.load(run_dir)
    evaluation = model.evaluate(split="test", search="exact", out_dir=tmp_path / "exact")
    trained = json.loads((run_dir / "metrics.json").read_text())["astra_ds"]
    assert evaluation.results["astra_ds"] == trained
    assert json.loads((tmp_path / "exact" / "metrics.json").read_text())["astra_ds"] == trained
    assert evaluation.about["topk"] == "exact" and evaluation.out_dir == tmp_path / "exact"
    assert "P " in evaluation.format() and str(tmp_path / "exact") in evaluation.format()
    with pytest.raises(ConfigError, match="search must be one of served, exact, both"):
        model.evaluate(search="ann")


def test_eval_never_overwrites_results(run_dir, capsys):
    first_eval = sorted(p.name for p in (run_dir / "evals").glob("*"))
    run_main("eval", "--run-dir", str(run_dir), "--exact")
    after = sorted(p.name for p in (run_dir / "evals").glob("*"))
    assert len(after) == len(first_eval) + 1
    newest = run_dir / "evals" / after[-1]
    assert json.loads((newest / "metrics.json").read_text())["topk"] == "exact"
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run_dir), "--out-dir", str(newest)]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    run_main("eval", "--run-dir", str(run_dir), "--out-dir", str(newest), "--overwrite")


def test_a_run_directory_travels_without_its_dataset(run_dir, synth_dir, tmp_path, monkeypatch, capsys):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run_dir, moved)
    monkeypatch.chdir(tmp_path)
    text = _test_texts(synth_dir)[0]
    capsys.readouterr()
    run_main("predict", "--run-dir", "elsewhere/run", "--text", text, "--top-k", "3", "--set",
             "data.path=/no/such/dataset")
    line = json.loads(capsys.readouterr().out)
    expected = astra_ds.load(run_dir).predict([text], k=3)
    assert line["text"] == text and line["ids"] == expected.ids[0].tolist() and line["names"] == expected.names[0]


def test_a_bf16_model_is_served_with_its_linears_cast_once_and_predicts_as_autocast_does(run_dir, synth_dir,
                                                                                            monkeypatch):
    """A model served under encoder.compute_dtype=bfloat16 holds its transformer's Linear weights in bfloat16 (cast
    once at load) and predicts what autocast over its float32 weights predicts, to the bit; the export's
    transformer stays float32."""
    from astra_ds.encoder.encoder import QueryEncoder
    from astra_ds.inference.xc_model import XCModel

    bf16 = ["encoder.compute_dtype=bfloat16"]
    texts = _test_texts(synth_dir)[:8]
    served = astra_ds.load(run_dir, bf16)
    linears = [m for m in served.encoder.backbone.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    got = served.predict(texts, k=5, exact=True, logits=True)
    exported = XCModel.load(run_dir, bf16, transformers_backbone=True)
    assert {p.dtype for p in exported.encoder.parameters()} == {torch.float32}
    monkeypatch.setattr(QueryEncoder, "cast_for_inference", lambda self: self)
    expected = astra_ds.load(run_dir, bf16).predict(texts, k=5, exact=True, logits=True)
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_array_equal(got.scores, expected.scores)


def test_the_export_loads_in_sentence_transformers(run_dir, synth_dir, tmp_path):
    import faiss
    import sentence_transformers

    out = tmp_path / "export"
    run_main("export", "--run-dir", str(run_dir), "--out", str(out))
    texts = _test_texts(synth_dir)[:16]
    model = astra_ds.load(run_dir)
    exported = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(exported.encode(texts), model.encode(texts), atol=1e-5)

    vectors = np.load(out / "labels" / "label_vectors.npy")
    rows = model.scoring_rows()
    np.testing.assert_allclose(vectors, rows.block_rows(0, 50).numpy(), rtol=1e-6)
    card = json.loads((out / "labels" / "card.json").read_text())
    queries = exported.encode(texts)
    _, ids = faiss.read_index(str(out / "labels" / "index.faiss")).search(queries, 5)
    np.testing.assert_array_equal(ids, model.predict(texts, k=5).ids)
    logits = card["scale"] * (queries @ vectors.T) + card["bias"]
    np.testing.assert_allclose(np.sort(logits, axis=1)[:, ::-1][:, :5], model.predict(texts, 5, logits=True).scores,
                               rtol=1e-4, atol=1e-4)


def test_the_index_command_rebuilds_the_serving_index(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "ann")
    assert astra_ds.load(copy).index is None  # exact search then
    capsys.readouterr()
    run_main("index", "--run-dir", str(copy), "--set", "index.kind=ivf_flat", "--set", "index.nlist=2")
    assert "serving index (ivf_flat) over 50 labels" in capsys.readouterr().out
    assert astra_ds.load(copy).index is not None


@pytest.mark.parametrize("args, message", [
    (["--text", " "], "empty text"),
    (["--text", "a", "--top-k", "0"], "--top-k must be >= 1"),
    (["--text", "a", "--top-k", "51"], "--top-k 51 exceeds the model's 50 labels"),
    (["--text", "a", "--out", "x.csv"], "the format comes from the extension"),
])
def test_predict_mistakes_give_one_line(run_dir, args, message, capsys):
    capsys.readouterr()
    assert main(["predict", "--run-dir", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("astra-ds: error: ") and err.count("\n") == 1 and message in err, err


def test_a_run_without_a_table_or_index_is_one_line(run_dir, tmp_path, capsys):
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    shutil.rmtree(broken / "ann")
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(broken), "--ann"]) == 2
    assert "has no serving index: build it with `astra-ds index" in capsys.readouterr().err
    shutil.rmtree(broken / "table")
    assert main(["predict", "--run-dir", str(broken), "--text", "a"]) == 2
    assert f"{broken} is damaged: table/" in capsys.readouterr().err
    (tmp_path / "exists.jsonl").write_text("")
    assert main(["predict", "--run-dir", str(run_dir), "--text", "a", "--out", str(tmp_path / "exists.jsonl")]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err


def test_eval_takes_any_k(run_dir, capsys):
    capsys.readouterr()
    run_main("eval", "--run-dir", str(run_dir), "--set", "eval.ks=[1, 10, 50]", "--set", "eval.psp=amazon",
             "--out-dir", str(run_dir / "evals" / "ks"))
    header = capsys.readouterr().out.splitlines()[0]
    assert header.split() == ["@1", "@10", "@50"]
    metrics = json.loads((run_dir / "evals" / "ks" / "metrics.json").read_text())
    assert (metrics["ks"], metrics["psp_a"], metrics["psp_b"]) == ([1, 10, 50], 0.6, 2.6)
    assert metrics["astra_ds"]["R@50"] == pytest.approx(1.0)  # every label retrieved


def test_eval_applies_the_dataset_s_filter_file(run_dir, synth_dir, tmp_path, capsys):
    """Each test point's top prediction declared a reciprocal pair: it leaves the top-k, the next moves up."""
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    top = sp.load_npz(run_dir / "predictions.npz")
    first = [int(top.indices[top.indptr[i]:top.indptr[i + 1]][np.argmax(top.data[top.indptr[i]:top.indptr[i + 1]])])
             for i in range(top.shape[0])]
    (data / "filter_labels_test.txt").write_text("".join(f"{i} {label}\n" for i, label in enumerate(first)))
    capsys.readouterr()
    run_main("eval", "--run-dir", str(run_dir), "--exact", "--set", f"data.path={data}",
             "--out-dir", str(tmp_path / "filtered"))
    assert f"filter_labels_test.txt applied: {len(first)} reciprocal pairs left out" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "filtered" / "metrics.json").read_text())
    assert metrics["filter"] == {"applied": True, "pairs": len(first)}
    filtered = sp.load_npz(tmp_path / "filtered" / "predictions.npz")
    for i, label in enumerate(first):
        row = filtered.indices[filtered.indptr[i]:filtered.indptr[i + 1]]
        assert label not in row and len(row) == 5
