"""Checkpoints: resumed == uninterrupted, re-slicing to another number of ranks, clear errors for a bad checkpoint
(a kill, a full disk or a signal at each write point of a save: tests/test_fault_matrix_train.py)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from astra_ds.data.synth import SynthConfig, generate
from astra_ds.digests import manifest
from astra_ds.table import store
from astra_ds.cli.main import main
from conftest import REPO, TINY_RUN, rewrite_meta, run_main
from test_distributed import LAUNCHERS, _env

# ASTRA (index rebuilt every epoch) and NGAME clusters, so that resuming within an epoch must restore both
RESUMABLE_RUN = [*TINY_RUN, "train.epochs=2", "train.log_every=1", "train.record_batches=true",
                 "negatives.strategy=astra", "index.kind=flat",  # an exact index: rebuilt alike in both runs
                 "negatives.warmup_epochs=0", "negatives.refresh_every=1", "negatives.in_batch=true",
                 "batching.mode=clustered", "batching.warmup_epochs=0", "batching.recluster_every=1",
                 "batching.cluster_size=4"]


def _sets(*overrides: str) -> list[str]:
    args = []
    for override in overrides:
        args += ["--set", override]
    return args


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _log(out) if "loss" in r}


def _batches(out) -> list[tuple[int, list[int]]]:
    return [(r["step"], r["batch"]) for r in _log(out) if "batch" in r]


def _rows(checkpoint_or_run) -> np.ndarray:
    return np.asarray(store.open_table(checkpoint_or_run / "table")["rows"][:])


def _train(synth_dir, data_cache, out, *overrides, resume=None):
    args = ["train", "--no-eval", *_sets(*RESUMABLE_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}",
                                         f"out_dir={out}", *overrides)]
    run_main(*args, *(["--resume", resume] if resume else []))


@pytest.fixture(scope="module")
def straight(synth_dir, data_cache, tmp_path_factory):
    """20 steps without interruption (16 steps an epoch: the run crosses an epoch boundary)."""
    out = tmp_path_factory.mktemp("straight")
    _train(synth_dir, data_cache, out, "train.max_steps=20")
    return out


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(straight, synth_dir, data_cache, tmp_path):
    out = tmp_path / "resumed"
    _train(synth_dir, data_cache, out, "train.max_steps=10")  # stops within epoch 0, checkpoint at step 10
    assert (out / "checkpoints" / "latest").read_text() == "global_step10"
    _train(synth_dir, data_cache, out, "train.max_steps=20", resume="auto")

    assert _batches(out) == _batches(straight) and [s for s, _ in _batches(out)] == list(range(1, 21))
    seconds = [r["train_seconds"] for r in _log(out) if "loss" in r]  # the resumed run carries on the clock
    assert len(seconds) == 20 and all(a < b for a, b in zip(seconds, seconds[1:]))
    expected = _losses(straight)
    assert sorted(_losses(out)) == sorted(expected)
    np.testing.assert_allclose([_losses(out)[s] for s in expected], list(expected.values()), rtol=1e-5)
    np.testing.assert_allclose(_rows(out / "checkpoints" / "global_step20"),
                               _rows(straight / "checkpoints" / "global_step20"), rtol=1e-5, atol=1e-7)


def test_unchanged_table_chunks_are_links_to_the_previous_checkpoint_only(synth_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    # 2 rows a chunk over 50 labels: a step touches some chunks only
    _train(synth_dir, data_cache, out, "train.max_steps=2", "checkpoint.save_every=1", "checkpoint.keep_last=5",
           "table.chunk_mb=0.0003", "negatives.num_negatives=1", "negatives.in_batch=false",
           "train.batch_size=2", "negatives.strategy=uniform", "batching.mode=random")
    first, second = out / "checkpoints" / "global_step1", out / "checkpoints" / "global_step2"
    chunks = sorted((first / "table" / "rows" / "c").iterdir(), key=lambda p: int(p.name))
    linked = [c.name for c in chunks if os.path.samefile(c / "0", second / "table" / "rows" / "c" / c.name / "0")]
    assert 0 < len(linked) < len(chunks)
    np.testing.assert_array_equal(_rows(second), np.asarray(store.open_table(out / "table")["rows"][:]))
    # the run's final table is a copy: damage to a checkpoint's chunk cannot reach it
    assert not any(os.path.samefile(c / "0", out / "table" / "rows" / "c" / c.name / "0")
                   for c in (second / "table" / "rows" / "c").iterdir())


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    """Enough labels (200k) that writing a checkpoint takes long enough to be killed in the middle."""
    return generate(SynthConfig(num_labels=200_000, num_train=512, num_test=64, vocab_size=500, seed=2),
                    tmp_path_factory.mktemp("wide") / "data")


@pytest.mark.slow
def test_resume_with_bfloat16_rows_and_an_ivf_pq_index_equals_uninterrupted(wide_data, data_cache, tmp_path):
    """The 120M-label configuration in small: bfloat16 rows (stochastic rounding) and an IVF-PQ index, which
    the checkpoint stores as a file; the resumed run takes the same negatives and the same rounding."""
    small = ["table.dtype=bfloat16", "index.kind=ivf_pq", "index.nlist=16", "index.train_rows=5000",
             "index.recall_queries=32"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(wide_data, data_cache, straight, *small, "train.max_steps=8")
    _train(wide_data, data_cache, resumed, *small, "train.max_steps=4")
    assert (resumed / "checkpoints" / "global_step4" / "negatives" / "rank0.faiss").is_file()
    _train(wide_data, data_cache, resumed, *small, "train.max_steps=8", resume="auto")
    expected = _losses(straight)
    assert sorted(_losses(resumed)) == sorted(expected)
    np.testing.assert_allclose([_losses(resumed)[s] for s in expected], list(expected.values()), rtol=1e-5)
    np.testing.assert_array_equal(_rows(resumed / "checkpoints" / "global_step8"),
                                  _rows(straight / "checkpoints" / "global_step8"))  # the same bits


UNIFORM_RUN = [*TINY_RUN, "train.log_every=1", "table.chunk_mb=0.002"]  # 2 shards of the 50 rows with 2 ranks


def _train_on(ranks, synth_dir, data_cache, out, steps, resume=None):
    args = _sets(*UNIFORM_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={out}",
                 f"train.max_steps={steps}") + ["--no-eval"] + (["--resume", resume] if resume else [])
    if ranks == 1:
        run_main("train", *args)
        return
    result = subprocess.run([LAUNCHERS["mpirun"], *args], cwd=REPO, env=_env(NPROC="2"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


@pytest.fixture(scope="module")
def straight_uniform(synth_dir, data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight_uniform")
    _train_on(1, synth_dir, data_cache, out, 6)
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_on_another_number_of_ranks(straight_uniform, synth_dir, data_cache, tmp_path):
    """One rank to step 2, two ranks to step 4, one rank to step 6: the table is re-sliced each time, the encoder
    state goes through DeepSpeed's universal checkpoint, and the run has the losses of an uninterrupted one."""
    for ranks, steps in ((1, 2), (2, 4), (1, 6)):
        _train_on(ranks, synth_dir, data_cache, tmp_path / "resumed", steps, resume="auto")
    expected, got = _losses(straight_uniform), _losses(tmp_path / "resumed")
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in expected], list(expected.values()), rtol=1e-4)
    np.testing.assert_allclose(_rows(tmp_path / "resumed"), _rows(straight_uniform), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_missing_or_corrupt_checkpoint_is_a_clear_error(synth_dir, data_cache, tmp_path, capsys):
    out = tmp_path / "run"
    _train(synth_dir, data_cache, out, "train.max_steps=2", "negatives.strategy=uniform", "batching.mode=random")
    checkpoint = out / "checkpoints" / "global_step2"
    common = _sets(*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={out}")

    def error(*resume: str) -> str:
        capsys.readouterr()
        assert main(["train", *common, *resume]) == 2
        err = capsys.readouterr().err
        assert err.startswith("astra-ds: error: ") and err.count("\n") == 1, err
        return err

    assert "no checkpoint at" in error("--resume", str(out / "checkpoints" / "global_step99"))
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text("{not json")
    assert "unreadable meta.json" in error("--resume", "auto")

    (checkpoint / "meta.json").write_text(json.dumps(meta))
    (checkpoint / "state.pt").unlink()
    assert "incomplete (missing state.pt)" in error("--resume", str(checkpoint))

    rewrite_meta(checkpoint, files=[], digests={}, num_labels=51)
    assert "has num_labels=51, this run has 50" in error("--resume", str(checkpoint))


def test_inspect_lists_tags_and_a_checksum_per_shard(straight, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints" / "global_step20", checkpoints / "global_step20")
    shutil.copytree(straight / "checkpoints" / "global_step20", checkpoints / "global_step30")
    rows = store.open_table(checkpoints / "global_step30" / "table", mode="r+")["rows"]
    rows[7] = rows[7] + 1
    (checkpoints / "global_step40.tmp").mkdir()  # a save that never finished
    (checkpoints / "latest").write_text("global_step30")

    def inspect() -> list[str]:
        result = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_checkpoint.py"), str(checkpoints)],
                                capture_output=True, text=True, cwd=REPO, env=_env(PYTHONPATH=str(REPO)))
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    damaged = inspect()[2]
    assert damaged.startswith("global_step30 (latest): unusable: checkpoint") and "is damaged (table/rows/c/0/0" in damaged
    meta = json.loads((checkpoints / "global_step30" / "meta.json").read_text())
    rewrite_meta(checkpoints / "global_step30", digests=manifest(checkpoints / "global_step30", meta["files"]))
    lines = inspect()
    assert lines[0].startswith("global_step20: step 20 (joint stage), 1 ranks, components encoder, table, negatives")
    assert lines[2].startswith("global_step30 (latest): step 20")  # a copy: its meta says step 20
    assert lines[4].startswith("global_step40.tmp: unusable: checkpoint") and "incomplete" in lines[4]
    checksum_20, checksum_30 = lines[1].split()[-1], lines[3].split()[-1]
    assert lines[1].split()[:4] == ["rank", "0", "[0,", "50)"] and checksum_20 != checksum_30


def test_init_from_takes_the_weights_with_fresh_optimizer_states(straight, synth_dir, data_cache, tmp_path):
    import torch

    from astra_ds.config import load_config
    from astra_ds.dist import init_distributed
    from astra_ds.rundir.run_dir import RunDir
    from astra_ds.training.trainer import Trainer

    checkpoint = straight / "checkpoints" / "global_step20"  # the end of the straight run: its encoder.pt
    cfg = load_config(None, [*RESUMABLE_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}",
                             f"out_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, init_distributed(), progress=False, init_from=str(checkpoint))
    assert trainer.step == 0 and trainer.stages[-1].batches.clustered_order is None
    np.testing.assert_array_equal(trainer.table.rows.numpy(), _rows(checkpoint))
    assert not trainer.table.optimizer.state["sum"].any()  # Adagrad sums start at zero
    assert not trainer.engine.optimizer.state  # no Adam moments yet
    weights = torch.load(RunDir(straight).encoder_weights)
    for name, value in trainer.engine.module.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
