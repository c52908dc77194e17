"""Training, evaluation and resume on a prepared directory (`data.path` naming one): the same run as on the
dataset's own files, which the run prepares into its cache in units of another size (the same batches, losses,
rows and metrics), its settings checked against the run's in one line."""

import functools
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import astra_ds
from astra_ds.cli.main import main
from astra_ds.config import load_config
from astra_ds.data.encoding import encode
from astra_ds.data.prepared import PreparedDirectory
from astra_ds.data.preparation import MANIFEST, UNITS, prepare
from astra_ds.data.synth import SynthConfig, generate
from astra_ds.encoder.encoder import build_tokenizer
from astra_ds.labels.row_scale import training_queries
from astra_ds.table import store
from conftest import TINY_RUN, run_cli

RUN = [*TINY_RUN, "train.max_steps=6", "train.log_every=1", "negatives.strategy=uniform", "batching.mode=random",
       "batching.length_pools=2", "eval.ann_index=false"]


def _sets(*overrides: str) -> list[str]:
    return [arg for override in (*RUN, *overrides) for arg in ("--set", override)]


@pytest.fixture(scope="module")
def prepared(synth_dir, tmp_path_factory) -> Path:
    cfg = load_config(None, [*RUN, f"data.path={synth_dir}"])
    out = tmp_path_factory.mktemp("prepared") / "synth"
    assert prepare(cfg, out, functools.partial(build_tokenizer, cfg.encoder), unit_rows=200, progress=False)
    return out


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _trained_alike(files: Path, prepared: Path, data_cache: Path, tmp_path: Path, steps: int, *options: str,
                   evaluate: bool = True) -> dict[str, Path]:
    """The runs on the dataset's files and on its prepared directory ("files", "prepared"), checked to have the
    same `steps` losses and the same rows."""
    runs = {}
    for name, path in (("files", files), ("prepared", prepared)):
        runs[name] = tmp_path / name
        sets = _sets(f"data.path={path}", f"data.cache_dir={data_cache}", f"out_dir={runs[name]}", *options)
        assert main(["train", *([] if evaluate else ["--no-eval"]), *sets]) == 0
    losses = [[r["loss"] for r in _log(run) if "loss" in r] for run in runs.values()]
    assert len(losses[0]) == steps
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    rows = [np.asarray(store.open_table(run / "table")["rows"][:]) for run in runs.values()]
    np.testing.assert_allclose(rows[1], rows[0], rtol=1e-5, atol=1e-7)
    return runs


def test_a_run_on_a_prepared_directory_equals_the_run_on_the_dataset_files(prepared, synth_dir, data_cache,
                                                                            tmp_path):
    runs = _trained_alike(synth_dir, prepared, data_cache, tmp_path, 6)
    metrics = [json.loads((run / "metrics.json").read_text()) for run in runs.values()]
    for model in ("astra_ds", "popularity"):  # propensities from the prepared label counts
        assert metrics[1][model] == pytest.approx(metrics[0][model], abs=1e-9)
    assert metrics[1]["num_test"] == 128

    # the plan reports the memory-mapped training data apart, as the bytes of its arrays
    shared = json.loads((runs["prepared"] / "memory.json").read_text())["shared"]
    arrays = sum(np.load(path, mmap_mode="r").nbytes for path in (prepared / UNITS).glob("*/train.*.npy"))
    assert [(line["component"], line["host"]) for line in shared] == [("prepared training data", arrays)]
    (files_line,) = json.loads((runs["files"] / "memory.json").read_text())["shared"]  # prepared into the cache
    assert files_line["host"] == arrays - 2 * 2 * 4  # one unit of 512 rows, not three of 200: two fewer offset pairs

    names = [(run / "label_names.txt").read_text() for run in runs.values()]
    assert names[1] == names[0] and len(names[0].split("\n")) == 50  # from the prepared label texts
    again = astra_ds.load(runs["prepared"]).evaluate(split="test", search="exact")
    assert again.results["astra_ds"] == pytest.approx(metrics[1]["astra_ds"], abs=1e-9)


def test_label_texts_as_queries_train_on_a_prepared_directory_as_on_the_files(synth_dir, data_cache, tmp_path):
    """An epoch and more (562 rows: 512 training queries, then the 50 label texts; 17 batches an epoch), so that
    the label texts are in the batches."""
    options = ["data.label_texts_as_queries=true", "train.epochs=2", "train.max_steps=20"]
    cfg = load_config(None, [*RUN, f"data.path={synth_dir}", *options])
    prepared = tmp_path / "prepared"
    assert prepare(cfg, prepared, functools.partial(build_tokenizer, cfg.encoder), unit_rows=200, progress=False)
    _trained_alike(synth_dir, prepared, data_cache, tmp_path, 20, *options, evaluate=False)


def test_a_resumed_run_on_a_prepared_directory_equals_an_uninterrupted_one(prepared, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "--no-eval", *_sets(f"data.path={prepared}", f"out_dir={straight}")]) == 0
    assert main(["train", "--no-eval", *_sets(f"data.path={prepared}", f"out_dir={resumed}",
                                              "train.max_steps=3")]) == 0
    assert main(["train", "--no-eval", "--resume", "auto", *_sets(f"data.path={prepared}",
                                                                  f"out_dir={resumed}")]) == 0
    losses = [{r["step"]: r["loss"] for r in _log(run) if "loss" in r} for run in (straight, resumed)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_labels_added_to_a_run_on_a_prepared_directory_are_scaled_on_its_training_queries(prepared, tmp_path,
                                                                                          caplog):
    run = tmp_path / "run"
    assert main(["train", "--no-eval", *_sets(f"data.path={prepared}", f"out_dir={run}", "encoder.dim=16",
                                              "eval.label_text_weight=0.5")]) == 0
    model = astra_ds.load(run)
    queries = training_queries(model.cfg, model.card, 50)
    part = PreparedDirectory(prepared).part("train")
    assert len(queries) == len(part)  # all of its 512 training rows (fewer than SAMPLE_QUERIES), decoded
    # decoded, they are the prepared rows: tokenised again, the same ids
    assert encode(model.tokenizer, queries, 32) == [ids.tolist() for ids in part.token_ids(np.arange(len(part)))]
    caplog.set_level(logging.INFO, logger="astra_ds")
    model.add_labels(["w460 w461", "w470"])
    assert "training data cannot be read" not in caplog.text and "the added labels' rows are scaled by" in caplog.text


@pytest.mark.parametrize("override, message", [
    ("data.max_len=24", "was prepared with data.max_len=32, and this run asks for 24: set data.max_len=32, or "
                        "prepare the data again"),
    ("data.validation_fraction=0.1", "was prepared with data.validation_fraction=0.0, and this run asks for 0.1"),
    ("data.label_texts_as_queries=true", "was prepared without data.label_texts_as_queries: prepare it again with "
                                         "--set data.label_texts_as_queries=true"),
])
def test_settings_other_than_the_prepared_ones_are_refused_in_one_line(override, message, prepared, tmp_path,
                                                                         capsys):
    assert main(["train", *_sets(f"data.path={prepared}", f"out_dir={tmp_path / 'run'}", override)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("astra-ds: error: ") and error.count("\n") == 1 and message in error, error


def test_a_directory_prepared_with_another_tokenizer_is_refused_in_one_line(prepared, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((prepared / MANIFEST).read_text())
    manifest["settings"]["tokenizer"] = "0" * 40
    (other / MANIFEST).write_text(json.dumps(manifest))
    assert main(["train", *_sets(f"data.path={other}", f"out_dir={tmp_path / 'run'}")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and ("was prepared with the tokenizer of encoder.model=tiny-random, and this "
                                        "run's tokenizer differs: prepare the data again") in error, error


@pytest.mark.slow
def test_a_rank_s_private_memory_is_flat_in_the_number_of_training_queries(tmp_path):
    """Prepared sets of 1,000 and 20,000 training queries (the same labels and test split): the private memory
    (RssAnon) of the run as its first step begins differs by under 40 B a query of the difference (measured at
    2,000 and 40,000: 4 KB in all; on the dataset's files, whose labels a rank holds as a CSR, 25 B a query).
    The two runs share the cores: what is measured is memory, not time."""
    runs = {}
    for num_train in (1_000, 20_000):
        data = generate(SynthConfig(num_labels=200, num_train=num_train, num_test=64, vocab_size=500, seed=1),
                        tmp_path / f"synth{num_train}")
        cfg = load_config(None, [*RUN, f"data.path={data}"])
        prepared = tmp_path / f"prepared{num_train}"
        assert prepare(cfg, prepared, functools.partial(build_tokenizer, cfg.encoder), progress=False)
        runs[num_train] = tmp_path / f"run{num_train}"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda n: run_cli("train", "--no-eval", *_sets(
            f"data.path={tmp_path / f'prepared{n}'}", f"out_dir={runs[n]}", "train.max_steps=2")), runs))
    assert all(result.returncode == 0 for result in results), [r.stderr[-3000:] for r in results]
    private = {n: json.loads((out / "memory.json").read_text())["rss_anon_at_start_bytes"] for n, out in runs.items()}
    assert private[20_000] - private[1_000] < 40 * 19_000, private


def test_a_prepared_directory_without_test_queries_trains_with_no_eval_and_says_so_without(synth_dir, tmp_path,
                                                                                          capsys):
    data = shutil.copytree(synth_dir, tmp_path / "no_test")
    (data / "tst_X.txt").write_text("")
    (data / "tst_X_Y.txt").write_text("0 50\n")  # its header: no query, 50 labels
    cfg = load_config(None, [*RUN, f"data.path={data}"])
    prepared = tmp_path / "prepared"
    assert prepare(cfg, prepared, functools.partial(build_tokenizer, cfg.encoder), progress=False)
    assert main(["train", *_sets(f"data.path={prepared}", f"out_dir={tmp_path / 'run'}")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "has no test queries, so the model could not be evaluated" in error
    assert main(["train", "--no-eval", *_sets(f"data.path={prepared}", f"out_dir={tmp_path / 'run'}",
                                              "train.max_steps=1")]) == 0
