"""The fault matrix of training (tests/test_fault_matrix.py has the commands on a finished run): `train` and
`finalize` with a full disk, a kill and a SIGTERM at each place in the code that writes (its start, the log, each
part of a checkpoint, the final save), then the user's next command. For `train` that is `train --resume auto`,
what a requeue script runs: it must finish the run as an uninterrupted one does, the same steps and the same model.
For `finalize`, the same `finalize` again: it publishes what an uninterrupted one publishes.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import astra_ds
from astra_ds.cli.main import main
from conftest import TINY_RUN
from faults import Injector, crash, one_line, point_at, sites, temporary_files

# two steps, a checkpoint after each (the second links the first's unchanged chunks); no serving index (the matrix
# of `astra-ds index` has its write points)
RUN = [*TINY_RUN, "negatives.strategy=uniform", "batching.mode=random", "train.max_steps=2", "train.log_every=1",
       "checkpoint.save_every=1", "table.chunk_mb=0.002", "eval.ann_index=false"]
TEXTS = ["tova rebu kide", "rebu"]


def _train(synth_dir, data_cache, out: Path, *options: str) -> int:
    sets = [arg for override in (*RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={out}")
            for arg in ("--set", override)]
    return main(["train", "--no-eval", *sets, *options])


def _finalize(run: Path) -> int:
    return main(["finalize", "--run-dir", str(run), "--no-eval"])


def _state(run: Path) -> dict:
    """What a user gets of a finished run: its step, its losses, what it predicts (verified on load)."""
    model = astra_ds.load(run)
    top = model.predict(TEXTS, k=5)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return {"step": model.card.step, "losses": {r["step"]: round(r["loss"], 5) for r in log if "loss" in r},
            "ids": top.ids.tolist(), "scores": np.round(top.scores, 5).tolist()}


def _watching(run: Path) -> dict:
    """The write points of a run directory, less TensorBoard's (its thread writes when it will)."""
    return {"roots": (run,), "ignore": (run / "tensorboard",)}


@pytest.fixture(scope="module")
def straight(synth_dir, data_cache, tmp_path_factory):
    """The uninterrupted run, its write points and, for each, whether the trainer's SIGTERM handler was on."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with Injector(**_watching(out)) as counting:
        assert _train(synth_dir, data_cache, out) == 0
    return _state(out), counting.points, counting.handled


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "crash", "signal"])
def test_train_with_a_fault_at_each_write_point_then_resume_auto(kind, straight, synth_dir, data_cache, tmp_path,
                                                                   capsys):
    expected, points, handled = straight
    assert points and any(handled), "the training writes nothing, or never with its SIGTERM handler on?"
    # a SIGTERM where the handler is off ends the process as a kill does (the crash cases)
    for case, at in enumerate(sites(points, handled if kind == "signal" else None)):
        out = tmp_path / str(case) / "run"
        out.parent.mkdir()  # as the uninterrupted run's was: a write point less
        train = lambda *options: _train(synth_dir, data_cache, out, *options)  # noqa: E731
        capsys.readouterr()
        if kind == "crash":
            crash(train, out, at, ignore=(out / "tensorboard",))
        else:
            with Injector(kind, at, **_watching(out)):
                status = train()
            if kind == "full":
                assert "the disk is full" in one_line(capsys, status), at
            else:  # the step in progress finished, then a checkpoint of it
                assert status == 143 and "stopped by SIGTERM at step" in capsys.readouterr().err, at
        assert not temporary_files(out) or kind == "crash", (at, temporary_files(out))
        capsys.readouterr()
        assert train("--resume", "auto") == 0, (at, capsys.readouterr().err[-2000:])
        assert not temporary_files(out), (at, temporary_files(out))
        assert _state(out) == expected, at


@pytest.fixture(scope="module")
def preempted(straight, synth_dir, data_cache, tmp_path_factory):
    """A run stopped by SIGTERM after its first step: a checkpoint, no model."""
    _, points, handled = straight
    out = tmp_path_factory.mktemp("preempted") / "run"
    with Injector("signal", point_at(points, handled.index(True)), **_watching(out)):
        assert _train(synth_dir, data_cache, out) == 143
    assert not (out / "manifest.json").exists()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "crash"])
def test_finalize_with_a_fault_at_each_write_point_then_again(kind, preempted, tmp_path, capsys):
    counted = shutil.copytree(preempted, tmp_path / "count" / "run")
    with Injector(**_watching(counted)) as counting:
        assert _finalize(counted) == 0
    expected = _state(counted)
    for case, at in enumerate(sites(counting.points)):
        run = shutil.copytree(preempted, tmp_path / str(case) / "run")
        capsys.readouterr()
        if kind == "crash":
            crash(lambda: _finalize(run), run, at, ignore=(run / "tensorboard",))
        else:
            with Injector(kind, at, **_watching(run)):
                status = _finalize(run)
            assert "the disk is full" in one_line(capsys, status), at
            assert not temporary_files(run), (at, temporary_files(run))
        capsys.readouterr()
        assert _finalize(run) == 0, (at, capsys.readouterr().err[-2000:])
        assert not temporary_files(run) and _state(run) == expected, at
