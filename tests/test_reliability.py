"""Nothing lost silently: damaged checkpoints and runs are found by their digests, `--resume auto` falls back to
the newest checkpoint that verifies, a non-finite loss stops before saving, SIGTERM / SIGINT end in a
checkpoint, a second run on a directory in use is refused, a failed resume changes nothing, and OS and file
errors read as one line."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from astra_ds.cli import main
from conftest import REPO, TINY_RUN, fresh_process_env, make_trainer, run_main

UNIFORM = [*TINY_RUN, "negatives.strategy=uniform", "batching.mode=random", "train.log_every=1"]


def _args(synth_dir, token_cache, out, *overrides: str) -> list[str]:
    return [arg for override in (*UNIFORM, f"data.path={synth_dir}", f"data.cache_dir={token_cache}",
                                 f"out_dir={out}", *overrides) for arg in ("--set", override)]


def _error(capsys, *args: str, status: int = 2) -> str:
    capsys.readouterr()
    assert main(list(args)) == status
    err = capsys.readouterr().err
    assert err.startswith("astra-ds: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def saved_run(synth_dir, token_cache, tmp_path_factory):
    """Checkpoints at steps 2 and 4 (the table in chunks of 4 rows), and the finished run."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    run_main("train", *_args(synth_dir, token_cache, out, "train.max_steps=4", "checkpoint.save_every=2",
                             "table.chunk_mb=0.0005"))
    return out


def _copy(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def test_a_checkpoint_of_a_stage_this_version_does_not_have_is_refused_in_one_line(saved_run, synth_dir,
                                                                                  token_cache, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    latest = run / "checkpoints" / "global_step4"
    meta = json.loads((latest / "meta.json").read_text())
    (latest / "meta.json").write_text(json.dumps(meta | {"stage": "warmup"}))
    err = _error(capsys, "train", "--resume", str(latest), *_args(synth_dir, token_cache, run, "train.max_steps=6"))
    assert "was written in a stage named 'warmup', which this version does not have" in err


def test_a_damaged_chunk_is_refused_and_auto_resume_falls_back(saved_run, synth_dir, token_cache, tmp_path, capsys,
                                                              caplog):
    caplog.set_level(logging.INFO, logger="astra_ds")
    run = _copy(saved_run, tmp_path)
    latest = run / "checkpoints" / "global_step4"
    chunk = latest / "table" / "rows" / "c" / "3" / "0"
    chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size))  # same size, other bytes
    err = _error(capsys, "train", "--resume", str(latest), *_args(synth_dir, token_cache, run, "train.max_steps=6"))
    assert f"checkpoint {latest} is damaged (table/rows/c/3/0 changed since it was written)" in err
    log = (run / "train_log.jsonl").read_text()
    assert main(["train", "--resume", "auto", *_args(synth_dir, token_cache, run, "train.max_steps=6")]) == 0
    assert "falling back to global_step2" in caplog.text
    assert "resumed from" in caplog.text and "global_step2" in caplog.text
    resumed = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert resumed == sorted(resumed) and resumed[-1] == 6 and log  # steps 3 and 4 done again, in order


def test_a_missing_chunk_is_an_error_not_zeros(saved_run, synth_dir, token_cache, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    latest = run / "checkpoints" / "global_step4"
    (latest / "table" / "rows" / "c" / "2" / "0").unlink()
    err = _error(capsys, "train", "--resume", str(latest), *_args(synth_dir, token_cache, run))
    assert "is incomplete (missing table/rows/c/2/0)" in err


def test_a_damaged_final_table_is_refused_by_eval_and_predict(saved_run, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    chunk = run / "table" / "rows" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[:4] = np.float32(np.nan).tobytes()
    chunk.write_bytes(bytes(data))
    assert "is damaged: table/rows/c/1/0 missing or changed" in _error(capsys, "eval", "--run-dir", str(run))
    assert "is damaged" in _error(capsys, "predict", "--run-dir", str(run), "--text", "a b")
    # the final table is a copy: the checkpoints of the run are untouched
    assert not os.path.samefile(chunk, run / "checkpoints" / "global_step4" / "table" / "rows" / "c" / "1" / "0")


def test_a_non_finite_loss_stops_before_saving(synth_dir, token_cache, tmp_path):
    from astra_ds.errors import TrainingError

    trainer = make_trainer(synth_dir, token_cache, tmp_path, "negatives.strategy=uniform", "batching.mode=random",
                           "checkpoint.save_every=1", "train.max_steps=3")
    trainer.parts.initialize_rows = lambda: trainer.table.rows.fill_(float("nan"))  # rows that start non-finite
    with pytest.raises(TrainingError, match=r"step 1: .*not finite|step 1: the loss is nan"):
        trainer.fit()
    assert not list((tmp_path / "checkpoints").glob("global_step*"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_in_a_checkpoint_and_its_exit_status(synth_dir, token_cache, tmp_path, signum):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "astra_ds", "train", "--no-eval",
            *_args(synth_dir, token_cache, out, "train.epochs=50")]
    process = subprocess.Popen(args, cwd=REPO, env=fresh_process_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    log, deadline = out / "train_log.jsonl", time.monotonic() + 300
    while not (log.is_file() and log.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its second step"
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"astra-ds: stopped by {signal.Signals(signum).name} at step ") and "Traceback" not in stderr
    step = int(line.split(" at step ")[1].split(":")[0])
    assert (out / "checkpoints" / "latest").read_text() == f"global_step{step}"
    assert not list((out / "checkpoints").glob("*.tmp"))
    steps = [json.loads(r)["step"] for r in log.read_text().splitlines()]
    assert steps[-1] == step  # the step in progress finished, no further one began


def test_a_second_run_on_a_directory_in_use_is_refused(synth_dir, token_cache, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from astra_ds.training.run_lock import "
                               "RunLock; RunLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
         str(out)], stdout=subprocess.PIPE, text=True, env=fresh_process_env())
    assert holder.stdout.readline().strip() == "held"
    err = _error(capsys, "train", *_args(synth_dir, token_cache, out, "train.max_steps=1"))
    assert f"{out} is in use by astra-ds pid {holder.pid} on " in err
    holder.kill()
    holder.wait()  # a dead holder leaves no stale lock
    run_main("train", "--no-eval", *_args(synth_dir, token_cache, out, "train.max_steps=1"))


def test_a_failed_resume_leaves_config_and_log_as_they_were(saved_run, synth_dir, token_cache, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    config, log = (run / "config.yaml").read_text(), (run / "train_log.jsonl").read_text()
    err = _error(capsys, "train", "--resume", "auto", *_args(synth_dir, token_cache, run, "encoder.dim=16"))
    assert "has dim=32, this run has 16" in err
    assert (run / "config.yaml").read_text() == config and (run / "train_log.jsonl").read_text() == log


def test_a_torn_last_log_line_is_dropped_on_resume(saved_run, synth_dir, token_cache, tmp_path, caplog):
    run = _copy(saved_run, tmp_path)
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"step": 5, "los')  # a crash in the middle of a line
    run_main("train", "--no-eval", "--resume", "auto", *_args(synth_dir, token_cache, run, "train.max_steps=5"))
    assert "1 unreadable line(s) dropped" in caplog.text
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps[-1] == 5 and steps == sorted(steps)


def test_os_and_file_errors_read_as_one_line(saved_run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert f"out_dir {afile} is a file" in _error(capsys, "train", "--set", f"out_dir={afile}",
                                                   "--set", "encoder.model=tiny-random")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n bad: [\n")
    assert f"{bad}:3:2: not valid YAML" in _error(capsys, "config", "show", "--config", str(bad))
    bad.write_text("- a\n- b\n")
    assert "a config is a mapping of sections" in _error(capsys, "config", "show", "--config", str(bad))
    assert "does not fit encoder.model=tiny-random, encoder.dim=16" in _error(
        capsys, "eval", "--run-dir", str(saved_run), "--set", "encoder.dim=16")


def test_a_truncated_state_file_names_the_file(saved_run, tmp_path):
    from astra_ds.errors import CheckpointError
    from astra_ds.files import load_torch_file

    state = tmp_path / "state.pt"
    state.write_bytes((saved_run / "checkpoints" / "global_step4" / "state.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{state} is damaged or truncated"):
        load_torch_file(state)
    torch.save({"ok": 1}, state)
    assert load_torch_file(state) == {"ok": 1}


def test_non_utf8_text_and_too_many_negatives_warn(synth_dir, token_cache, tmp_path, caplog):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    texts = (data / "trn_X.txt").read_bytes().split(b"\n")
    texts[3] = texts[3] + b" \xff\xfe"
    (data / "trn_X.txt").write_bytes(b"\n".join(texts))
    run_main("train", "--no-eval", *_args(data, token_cache, tmp_path / "run", "train.max_steps=1",
                                          "negatives.num_negatives=60"))
    assert "trn_X.txt: 1 lines hold bytes that are not UTF-8" in caplog.text
    assert "negatives.num_negatives=60 is not below the 50 labels" in caplog.text


def test_a_full_disk_is_said_as_such(synth_dir, token_cache, tmp_path, monkeypatch):
    """A full disk cannot be made here: torch.save fails as it does on one (an iostream-style RuntimeError) and
    the disk reports no free bytes."""
    import errno
    import shutil

    import astra_ds.training.checkpoint as checkpoint
    from astra_ds.cli import _message
    from astra_ds.errors import CheckpointError

    trainer = make_trainer(synth_dir, token_cache, tmp_path, "negatives.strategy=uniform", "batching.mode=random",
                           "checkpoint.save_every=1", "train.max_steps=2")

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(CheckpointError, match=r"the disk is full: writing a checkpoint into .*checkpoints failed "
                                              r"\(0 bytes free\); the previous checkpoint is intact"):
        trainer.fit()
    assert _message(OSError(errno.ENOSPC, "No space left on device", "/data/run/x")) == "the disk is full: /data/run/x"
    assert _message(FileExistsError(errno.EEXIST, "File exists", "/data/run")) == "File exists: /data/run"
