"""A validation split held out of the training queries (data.validation_fraction): by a hash of each row keyed by the
run's seed, never trained on, evaluated along training instead of the test split, and again by `astra-ds eval
--split validation`."""

import json

import numpy as np
import pytest
import torch
import yaml
import zarr

import astra_ds
from astra_ds.config import load_config
from astra_ds.data.preparation import validation_mask
from astra_ds.data.prepare import prepare_data
from astra_ds.data.readers import read_dataset
from astra_ds.errors import ConfigError
from astra_ds.encoder.encoder import build_tokenizer
from conftest import TINY_RUN, run_main


def test_the_validation_split_is_held_out_of_the_training_queries_by_the_seed(synth_dir, data_cache, tmp_path):
    cfg = load_config(None, [*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}",
                             "data.validation_fraction=0.1", "train.seed=3"])
    tokenizer = build_tokenizer(cfg.encoder)
    full = read_dataset(synth_dir)
    data = prepare_data(cfg, tokenizer)
    held_out = np.flatnonzero(validation_mask(np.arange(512), 0.1, seed=3))  # by a hash of each row's number
    kept = np.setdiff1d(np.arange(512), held_out)
    assert len(data.validation.tokens) == len(held_out) == 49 and len(data.train) == 512 - 49
    assert (data.train.labels(np.arange(len(kept))) != (full.train.labels[kept] > 0)).nnz == 0
    assert (data.validation.labels != (full.train.labels[held_out] > 0)).nnz == 0
    cfg.data.validation_fraction = 0.0
    whole = prepare_data(cfg, tokenizer)
    for got, expected in zip(data.validation.tokens.batch(np.arange(49)), whole.train.batch(held_out)):
        assert torch.equal(got, expected)
    assert data.split("validation") is data.validation and data.split("test").name == "test"
    assert np.flatnonzero(validation_mask(np.arange(512), 0.1, seed=4)).tolist() != held_out.tolist()
    cfg.data.validation_fraction, cfg.data.path = 0.01, str(_three_queries(synth_dir, tmp_path))
    with pytest.raises(ConfigError, match="data.validation_fraction=0.01 holds out none of the 3 training queries"):
        prepare_data(cfg, tokenizer)
    with pytest.raises(ConfigError, match="data.validation_fraction must be in"):
        load_config(None, ["data.validation_fraction=1"])


def _three_queries(synth_dir, parent):
    """The synthetic dataset cut to its first three training queries."""
    out = parent / "three"
    out.mkdir(exist_ok=True)
    for path in synth_dir.iterdir():
        lines = path.read_text().splitlines(keepends=True)
        if path.name == "trn_X.txt":
            lines = lines[:3]
        elif path.name == "trn_X_Y.txt":
            lines = [f"3 {lines[0].split()[1]}\n", *lines[1:4]]
        (out / path.name).write_text("".join(lines))
    return out


def test_a_run_evaluates_along_on_validation_and_eval_reads_the_same_split(synth_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    sets = [*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={out}",
            "data.validation_fraction=0.25", "train.epochs=2", "eval.every_epochs=1", "train.record_batches=true"]
    run_main("train", *[a for s in sets for a in ("--set", s)])
    held_out = np.flatnonzero(validation_mask(np.arange(512), 0.25, seed=0))  # 128: 384 train, 12 steps of 32
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    batches = np.concatenate([r["batch"] for r in records if "batch" in r])
    assert len(batches) == 2 * 12 * 32 and batches.max() < 384  # rows of the kept queries only
    along = [r for r in records if "validation_P@1" in r]
    assert [r["step"] for r in along] == [0, 12] and not any("test_P@1" in r for r in records)
    assert json.loads((out / "metrics.json").read_text())["split"] == "test"

    run_main("eval", "--run-dir", str(out), "--split", "validation", "--exact", "--out-dir", str(tmp_path / "v"))
    metrics = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert metrics["split"] == "validation" and metrics["num_test"] == 128
    texts = read_dataset(synth_dir).train.texts
    labels = read_dataset(synth_dir).train.labels[held_out]
    top1 = astra_ds.load(out).predict([texts[i] for i in held_out], k=1, exact=True).ids[:, 0]
    hand = np.mean([labels[i, label] > 0 for i, label in enumerate(top1)])
    assert metrics["astra_ds"]["P@1"] == pytest.approx(hand, abs=1e-9)


EARLY_STOPPING = ["data.validation_fraction=0.25", "eval.every_epochs=1", "eval.patience=2", "train.epochs=1",
                  "classifier.epochs=30", "classifier.batch_size=64", "train.record_batches=true", "train.log_every=1"]


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _stopping_point(curve: list[float], patience: int, min_delta: float) -> tuple[int, float]:
    """By hand: the evaluation (0 = before the first step) a stage stops at, and the best P@1 it keeps."""
    best, since = -1.0, 0
    for position, p1 in enumerate(curve):
        best, since = (p1, 0) if p1 > best + min_delta else (best, since + 1)
        if position and since >= patience:
            return position, best
    raise AssertionError(f"the curve {curve} does not stop")


@pytest.mark.parametrize("min_delta", [0.0, 0.09])  # 0.09: gains below 9 points of P@1 do not count
def test_a_stage_stops_once_validation_p1_has_not_improved_for_patience_evaluations(synth_dir, data_cache, tmp_path,
                                                                                    min_delta):
    out = tmp_path / "run"
    sets = [*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={out}", *EARLY_STOPPING,
            f"eval.min_delta={min_delta}"]
    run_main("train", *[a for s in sets for a in ("--set", s)])
    records = _log(out)
    curve = [r["validation_P@1"] for r in records if "validation_P@1" in r and r["stage"] == "classifier"]
    (stop,) = [r for r in records if r.get("stopped_early")]
    position, best = _stopping_point(curve, 2, min_delta)
    assert position == len(curve) - 1
    assert stop["best_P@1"] == best and stop["step"] == 6 * position < 30 * 6  # 6 steps an epoch
    stages = [(r["step"], r["stage"]) for r in records if "loss" in r]
    assert stages == [(s, "classifier") for s in range(1, stop["step"] + 1)] + [
        (s, "joint") for s in range(stop["step"] + 1, stop["step"] + 13)]  # 12 joint steps follow at once
    with pytest.raises(ConfigError, match="eval.patience stops stages on the validation split"):
        load_config(None, ["eval.patience=2", "eval.every_epochs=1"])


def test_a_run_resumed_after_an_early_stop_equals_an_uninterrupted_one(synth_dir, data_cache, tmp_path):
    def sets(out, *more):
        return [a for s in [*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={out}",
                            *EARLY_STOPPING, *more] for a in ("--set", s)]

    run_main("train", "--no-eval", *sets(tmp_path / "straight"))
    stop = next(r["step"] for r in _log(tmp_path / "straight") if r.get("stopped_early"))
    run_main("train", "--no-eval", *sets(tmp_path / "resumed", f"train.max_steps={stop + 2}"))  # into the joint stage
    run_main("train", "--no-eval", "--resume", "auto", *sets(tmp_path / "resumed"))
    for key in ("batch", "loss", "validation_P@1"):
        straight = [(r["step"], r[key]) for r in _log(tmp_path / "straight") if key in r]
        assert straight == [(r["step"], r[key]) for r in _log(tmp_path / "resumed") if key in r], key
    rows = [np.asarray(zarr.open_group(tmp_path / run / "table", mode="r")["rows"][:])
            for run in ("straight", "resumed")]
    np.testing.assert_array_equal(rows[0], rows[1])


def _table_arrays(run) -> dict[str, np.ndarray]:
    """Rows and optimizer state of a run's saved table."""
    group = zarr.open_group(run / "table", mode="r")
    arrays = {"rows": np.asarray(group["rows"][:])}
    return arrays | {f"optim/{name}": np.asarray(a[:]) for name, a in group["optim"].arrays()}


def test_keep_best_ends_a_stage_with_the_rows_of_its_best_evaluation_also_when_resumed(synth_dir, data_cache,
                                                                                       tmp_path):
    def train(out, *more, resume=()):
        run_main("train", "--no-eval", *resume, *[a for s in [*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}",
                                                     f"out_dir={tmp_path / out}", *EARLY_STOPPING, "train.epochs=0",
                                                     "eval.min_delta=0.01", "train.seed=3", *more]
                                                     for a in ("--set", s)])
        return _log(tmp_path / out)

    records = train("kept", "eval.keep_best=true")  # seed 3: its curve rises, then falls below its best
    curve = [(r["step"], r["validation_P@1"]) for r in records if "validation_P@1" in r]
    position, best = _stopping_point([p1 for _, p1 in curve], 2, 0.01)
    best_step = curve[[p1 for _, p1 in curve].index(best)][0]
    assert curve[-1][1] < best and best_step < curve[-1][0]  # it stopped below its best: there is something to undo
    train("until_best", f"train.max_steps={best_step}")  # the rows as they were at the best evaluation
    kept, at_best = _table_arrays(tmp_path / "kept"), _table_arrays(tmp_path / "until_best")
    assert kept.keys() == at_best.keys()
    for name in kept:
        np.testing.assert_array_equal(kept[name], at_best[name], err_msg=name)
    train("resumed", "eval.keep_best=true", f"train.max_steps={best_step + 1}")  # killed after the copy was taken
    train("resumed", "eval.keep_best=true", resume=("--resume", "auto"))
    resumed = _table_arrays(tmp_path / "resumed")
    for name in kept:
        np.testing.assert_array_equal(kept[name], resumed[name], err_msg=name)
    with pytest.raises(ConfigError, match="eval.keep_best keeps the rows of the best evaluation"):
        load_config(None, ["eval.keep_best=true", "eval.every_epochs=1"])


@pytest.mark.slow
def test_keep_best_takes_a_joint_stage_back_to_its_best_evaluation_also_when_resumed(synth_dir, data_cache,
                                                                                    tmp_path):
    def train(out, *more, resume=()):
        run_main("train", "--no-eval", *resume, *[a for s in [
            *TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={tmp_path / out}",
            "data.validation_fraction=0.25", "eval.every_epochs=1", "classifier.epochs=0", "train.epochs=4",
            "classifier.refit_epochs=1", "classifier.batch_size=64", "train.encoder_lr=3e-2", "eval.keep_best=true",
            "checkpoint.keep_last=1", "train.log_every=1", *more] for a in ("--set", s)])
        return _log(tmp_path / out)

    records = train("kept")
    curve = [(r["step"], r["validation_P@1"]) for r in records if r.get("stage") == "joint" and "validation_P@1" in r]
    best = max(p1 for _, p1 in curve)
    best_step = next(step for step, p1 in curve if p1 == best)  # the first of equals
    assert best_step < curve[-1][0]  # the stage ended after its best: there is something to undo
    (back,) = [r for r in records if "back_to_best_step" in r]
    assert back["back_to_best_step"] == best_step and back["best_P@1"] == best
    refit = [r["step"] for r in records if r.get("stage") == "refit" and "loss" in r]
    assert refit[0] == best_step + 1  # the refit follows the best step
    checkpoints = sorted(p.name for p in (tmp_path / "kept" / "checkpoints").glob("global_step*"))
    assert checkpoints == [f"global_step{refit[-1]}"]  # the undone steps' checkpoints are gone

    # the run whose joint stage ends at that evaluation, from scratch: the same encoder and rows at the end
    train("until_best", f"train.epochs={best_step // 12}")  # 12 steps an epoch
    kept, at_best = _table_arrays(tmp_path / "kept"), _table_arrays(tmp_path / "until_best")
    for name in kept:
        np.testing.assert_array_equal(kept[name], at_best[name], err_msg=name)
    encoders = [torch.load(tmp_path / run / "encoder.pt") for run in ("kept", "until_best")]
    for name, weight in encoders[1].items():
        torch.testing.assert_close(encoders[0][name], weight, rtol=0, atol=0)

    # killed after the best checkpoint, before the stage's end; resumed: the same end
    train("resumed", f"train.max_steps={curve[-1][0] - 1}")
    train("resumed", resume=("--resume", "auto"))
    resumed = _table_arrays(tmp_path / "resumed")
    for name, array in _table_arrays(tmp_path / "kept").items():
        np.testing.assert_array_equal(array, resumed[name], err_msg=name)


@pytest.mark.slow
def test_the_dual_scoring_weight_is_chosen_on_the_validation_split(synth_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    sets = [*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={out}",
            "data.validation_fraction=0.25", "eval.label_text_weights=[0, 0.5, 2]"]
    run_main("train", *[a for s in sets for a in ("--set", s)])
    (choice,) = [r for r in _log(out) if "label_text_weight" in r]
    p1 = dict(choice["validation_P@1_by_label_text_weight"])
    assert list(p1) == [0.0, 0.5, 2.0] and len(set(p1.values())) > 1  # the weights rank differently
    assert choice["label_text_weight"] == max(p1, key=lambda weight: (p1[weight], -list(p1).index(weight)))
    saved = yaml.safe_load((out / "config.yaml").read_text())["eval"]
    assert saved["label_text_weight"] == choice["label_text_weight"] == json.loads(
        (out / "model.json").read_text())["label_text_weight"]
    run_main("eval", "--run-dir", str(out), "--split", "validation", "--exact", "--out-dir", str(tmp_path / "v"))
    again = json.loads((tmp_path / "v" / "metrics.json").read_text())["astra_ds"]["P@1"]
    assert again == pytest.approx(p1[choice["label_text_weight"]], abs=1e-9)
    with pytest.raises(ConfigError, match="eval.label_text_weights are chosen among on the validation split"):
        load_config(None, ["eval.label_text_weights=[0, 0.5]"])
