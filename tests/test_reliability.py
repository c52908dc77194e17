"""Nothing lost silently: damaged checkpoints and runs are found by their digests, `--resume auto` falls back to
the newest checkpoint that verifies, a non-finite loss stops before saving, SIGTERM / SIGINT end in a
checkpoint, a second run on a directory in use is refused, a failed resume changes nothing, and OS and file
errors read as one line."""

import errno
import gzip
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import astra_ds
from astra_ds.cli.main import main
from astra_ds.data.readers import read_dataset
from conftest import REPO, TINY_RUN, fresh_process_env, make_trainer, rewrite_meta, run_main

UNIFORM = [*TINY_RUN, "negatives.strategy=uniform", "batching.mode=random", "train.log_every=1"]
SAVED = ("checkpoint.save_every=2", "table.chunk_mb=0.0005")  # saved_run's settings, which a resume keeps


def _args(synth_dir, data_cache, out, *overrides: str) -> list[str]:
    return [arg for override in (*UNIFORM, f"data.path={synth_dir}", f"data.cache_dir={data_cache}",
                                 f"out_dir={out}", *overrides) for arg in ("--set", override)]


def _error(capsys, *args: str, status: int = 2) -> str:
    capsys.readouterr()
    assert main(list(args)) == status
    err = capsys.readouterr().err
    assert err.startswith("astra-ds: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def saved_run(synth_dir, data_cache, tmp_path_factory):
    """Checkpoints at steps 2 and 4 (the table in chunks of 4 rows), and the finished run."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    run_main("train", *_args(synth_dir, data_cache, out, "train.max_steps=4", *SAVED))
    return out


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def test_a_checkpoint_of_a_stage_this_version_does_not_have_is_refused_in_one_line(saved_run, synth_dir,
                                                                                  data_cache, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    latest = run / "checkpoints" / "global_step4"
    rewrite_meta(latest, stage="warmup")  # as another version would have written it
    err = _error(capsys, "train", "--resume", str(latest), *_args(synth_dir, data_cache, run, "train.max_steps=6", *SAVED))
    assert "was written in a stage named 'warmup', which this version does not have" in err


def test_a_damaged_chunk_is_refused_and_auto_resume_falls_back(saved_run, synth_dir, data_cache, tmp_path, capsys,
                                                              caplog):
    caplog.set_level(logging.INFO, logger="astra_ds")
    run = _copy(saved_run, tmp_path)
    latest = run / "checkpoints" / "global_step4"
    chunk = latest / "table" / "rows" / "c" / "3" / "0"
    chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size))  # same size, other bytes
    err = _error(capsys, "train", "--resume", str(latest), *_args(synth_dir, data_cache, run, "train.max_steps=6", *SAVED))
    assert f"checkpoint {latest} is damaged (table/rows/c/3/0 changed since it was written)" in err
    log = (run / "train_log.jsonl").read_text()
    assert main(["train", "--resume", "auto", *_args(synth_dir, data_cache, run, "train.max_steps=6", *SAVED)]) == 0
    assert "falling back to global_step2" in caplog.text
    assert "resumed from" in caplog.text and "global_step2" in caplog.text
    resumed = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert resumed == sorted(resumed) and resumed[-1] == 6 and log  # steps 3 and 4 done again, in order


def test_a_missing_chunk_is_an_error_not_zeros(saved_run, synth_dir, data_cache, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    latest = run / "checkpoints" / "global_step4"
    (latest / "table" / "rows" / "c" / "2" / "0").unlink()
    err = _error(capsys, "train", "--resume", str(latest), *_args(synth_dir, data_cache, run, *SAVED))
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


def test_a_non_finite_loss_stops_before_saving(synth_dir, data_cache, tmp_path):
    from astra_ds.errors import TrainingError

    trainer = make_trainer(synth_dir, data_cache, tmp_path, "negatives.strategy=uniform", "batching.mode=random",
                           "checkpoint.save_every=1", "train.max_steps=3")
    trainer.parts.initialize_rows = lambda: trainer.table.rows.fill_(float("nan"))  # rows that start non-finite
    with pytest.raises(TrainingError, match=r"step 1: .*not finite|step 1: the loss is nan"):
        trainer.fit()
    assert not list((tmp_path / "checkpoints").glob("global_step*"))


@pytest.mark.slow
def test_a_signal_ends_in_a_checkpoint_and_its_exit_status(synth_dir, data_cache, tmp_path):
    """SIGTERM to the process (SIGINT is handled alike; a SIGTERM at each write point of a training:
    tests/test_fault_matrix_train.py)."""
    signum = signal.SIGTERM
    out = tmp_path / "run"
    args = [sys.executable, "-m", "astra_ds", "train", "--no-eval",
            *_args(synth_dir, data_cache, out, "train.epochs=50")]
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


def _hold_lock(directory) -> subprocess.Popen:
    """Another process holding the run lock of `directory` (for 60 s, or until killed)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from astra_ds.rundir.lock import "
                               "RunLock; RunLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
         str(directory)], stdout=subprocess.PIPE, text=True, env=fresh_process_env())
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_directory_in_use_is_refused(synth_dir, data_cache, tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    err = _error(capsys, "train", *_args(synth_dir, data_cache, out, "train.max_steps=1"))
    assert f"{out} is in use by astra-ds pid {holder.pid} on " in err
    holder.kill()
    holder.wait()  # a dead holder leaves no stale lock
    run_main("train", "--no-eval", *_args(synth_dir, data_cache, out, "train.max_steps=1"))


def test_a_failed_resume_leaves_config_and_log_as_they_were(saved_run, synth_dir, data_cache, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    config, log = (run / "config.yaml").read_text(), (run / "train_log.jsonl").read_text()
    err = _error(capsys, "train", "--resume", "auto", *_args(synth_dir, data_cache, run, "encoder.dim=16"))
    assert "has dim=32, this run has 16" in err
    assert (run / "config.yaml").read_text() == config and (run / "train_log.jsonl").read_text() == log


def test_a_torn_last_log_line_is_dropped_on_resume(saved_run, synth_dir, data_cache, tmp_path, caplog):
    run = _copy(saved_run, tmp_path)
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"step": 5, "los')  # a crash in the middle of a line
    run_main("train", "--no-eval", "--resume", "auto", *_args(synth_dir, data_cache, run, "train.max_steps=5", *SAVED))
    assert "1 unreadable line(s) dropped" in caplog.text
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps[-1] == 5 and steps == sorted(steps)


def test_os_and_file_errors_read_as_one_line(saved_run, synth_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert f"out_dir {afile} is a file" in _error(capsys, "train", "--set", f"out_dir={afile}",
                                                   "--set", "encoder.model=tiny-random", "--set",
                                                   f"data.path={synth_dir}")
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


def test_non_utf8_text_is_counted_or_refused_and_crlf_is_no_part_of_a_text(synth_dir, data_cache, tmp_path,
                                                                           caplog, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    texts = (data / "trn_X.txt").read_bytes().split(b"\n")
    texts[3] = texts[3] + b" \xff\xfe"
    (data / "trn_X.txt").write_bytes(b"\r\n".join(texts))  # and CRLF line ends
    (data / "Y.txt").write_bytes((data / "Y.txt").read_bytes().replace(b"\n", b"\r\n"))
    run_main("train", "--no-eval", *_args(data, data_cache, tmp_path / "run", "train.max_steps=1",
                                          "negatives.num_negatives=60"))
    assert "1 train texts hold bytes that are not UTF-8 (read as U+FFFD), first at line 4" in caplog.text
    assert "negatives.num_negatives=60 is not below the 50 labels" in caplog.text
    assert "data.on_bad_text=error" not in caplog.text
    dataset = read_dataset(data)
    assert not any("\r" in text for text in dataset.train.texts + dataset.label_texts)
    assert dataset.train.texts[0] == read_dataset(synth_dir).train.texts[0]
    capsys.readouterr()
    run_main("data", "validate", str(data), "--set", "encoder.model=tiny-random")
    assert "texts with bytes that are not UTF-8: 1 train texts (first at line 4)" in capsys.readouterr().out
    assert "the train texts hold bytes that are not UTF-8, first at line 4" in _error(
        capsys, "train", *_args(data, data_cache, tmp_path / "strict", "data.on_bad_text=error"))

    gzipped = shutil.copytree(data, tmp_path / "gzipped")  # a layout read whole: counted once all the same
    (gzipped / "trn_X.txt.gz").write_bytes(gzip.compress((gzipped / "trn_X.txt").read_bytes()))
    (gzipped / "trn_X.txt").unlink()
    caplog.clear()
    run_main("train", "--no-eval", *_args(gzipped, data_cache, tmp_path / "run_gz", "train.max_steps=1"))
    assert caplog.text.count("hold bytes that are not UTF-8") == 1
    assert "1 train texts hold bytes that are not UTF-8 (read as U+FFFD), first at line 4" in caplog.text
    assert "the train texts hold bytes that are not UTF-8, first at line 4" in _error(
        capsys, "train", *_args(gzipped, data_cache, tmp_path / "strict_gz", "data.on_bad_text=error"))


def _fill_the_disk(monkeypatch, module, error: str) -> None:
    """A full disk cannot be made here: torch.save in `module` fails as it does on one (an iostream-style
    RuntimeError) and the disk reports no free bytes."""
    def full_disk(*args, **kwargs):
        raise RuntimeError(error)

    monkeypatch.setattr(module.torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))


def test_a_full_disk_is_said_as_such(synth_dir, data_cache, tmp_path, monkeypatch):
    import astra_ds.training.checkpoint as checkpoint
    from astra_ds.cli.main import _message
    from astra_ds.errors import CheckpointError

    trainer = make_trainer(synth_dir, data_cache, tmp_path, "negatives.strategy=uniform", "batching.mode=random",
                           "checkpoint.save_every=1", "train.max_steps=2")
    _fill_the_disk(monkeypatch, checkpoint, "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
    with pytest.raises(CheckpointError, match=r"the disk is full: writing checkpoint global_step1 into .*checkpoints "
                                              r"failed \(0 bytes free\); no checkpoint of this run had been "
                                              r"written yet"):
        trainer.fit()
    assert not list((tmp_path / "checkpoints").glob("*"))  # what the save had written went with it
    assert _message(OSError(errno.ENOSPC, "No space left on device", "/data/run/x")) == "the disk is full: /data/run/x"
    assert _message(FileExistsError(errno.EEXIST, "File exists", "/data/run")) == "File exists: /data/run"


# ---- a run is used only when it is complete, its own and safe to load -------------------------------------------

def test_a_run_killed_while_saving_its_model_is_refused_not_used(synth_dir, data_cache, tmp_path, monkeypatch,
                                                                 capsys):
    from astra_ds.table.table import ClassifierTable

    out = tmp_path / "run"
    original = ClassifierTable.save

    def killed_halfway(self, path, *args, **kwargs):
        if Path(path) == out / "table":  # the final save, not a checkpoint's: half the chunks, then the end
            self.dirty[len(self.dirty) // 2:] = False
            original(self, path, out / "checkpoints" / "global_step2" / "table", **kwargs)
            raise OSError(errno.EIO, "killed", str(path))
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(ClassifierTable, "save", killed_halfway)
    assert main(["train", *_args(synth_dir, data_cache, out, "train.max_steps=2", *SAVED)]) == 2
    monkeypatch.undo()
    for command in (["predict", "--run-dir", str(out), "--text", "a b"], ["eval", "--run-dir", str(out)],
                    ["index", "--run-dir", str(out)]):
        assert f"{out} is not a finished run: its training has not saved a complete model" in _error(capsys, *command)
    run_main("train", "--resume", "auto", *_args(synth_dir, data_cache, out, "train.max_steps=2", *SAVED))
    assert astra_ds.load(out).predict(["a b"], k=2).ids.shape == (1, 2)  # finished by the resume


def test_a_run_without_its_manifest_or_with_a_changed_config_is_refused(saved_run, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config + "# edited\n")
    assert "is damaged: config.yaml missing or changed" in _error(capsys, "predict", "--run-dir", str(run),
                                                                  "--text", "a")
    (run / "config.yaml").write_text(config)
    (run / "manifest.json").unlink()
    assert "is not a finished run" in _error(capsys, "predict", "--run-dir", str(run), "--text", "a")
    assert f"no run at {tmp_path / 'nowhere'}" in _error(capsys, "eval", "--run-dir", str(tmp_path / "nowhere"))


def test_a_damaged_or_truncated_serving_index_is_refused_until_rebuilt(saved_run, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    index = run / "ann" / "index.faiss"
    data = bytearray(index.read_bytes())
    data[-8:] = bytes(8)  # the last vector's bytes: faiss reads them without a word
    index.write_bytes(bytes(data))
    assert f"{index} is damaged (changed since it was built): rebuild it with `astra-ds index" in _error(
        capsys, "predict", "--run-dir", str(run), "--text", "a b")
    index.write_bytes(bytes(data[:len(data) // 2]))
    assert f"{index} is damaged" in _error(capsys, "eval", "--run-dir", str(run), "--ann")
    run_main("index", "--run-dir", str(run))
    expected = astra_ds.load(saved_run).predict(["a b"], k=3)
    assert astra_ds.load(run).predict(["a b"], k=3).ids.tolist() == expected.ids.tolist()


def test_evaluations_at_once_each_get_their_own_directory(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from astra_ds.rundir.run_dir import RunDir

    (tmp_path / "evals" / "1").mkdir(parents=True)
    with ThreadPoolExecutor(8) as pool:
        claimed = list(pool.map(lambda _: RunDir(tmp_path).claim_eval_dir(), range(16)))
    assert sorted(int(path.name) for path in claimed) == list(range(2, 18))


def test_training_into_a_finished_run_needs_overwrite(saved_run, synth_dir, data_cache, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    before = (run / "manifest.json").read_text()
    assert f"out_dir {run} holds an earlier run: continue it with --resume auto, replace it with --overwrite" in \
        _error(capsys, "train", *_args(synth_dir, data_cache, run, "train.max_steps=1"))
    assert (run / "manifest.json").read_text() == before
    run_main("train", "--overwrite", "--no-eval", *_args(synth_dir, data_cache, run, "train.max_steps=1"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["global_step1", "latest"]
    assert not (run / "metrics.json").exists() and astra_ds.load(run).card.step == 1


def test_a_checkpoint_directory_in_use_by_another_run_is_refused(synth_dir, data_cache, tmp_path, capsys):
    shared = tmp_path / "shared_checkpoints"
    holder = _hold_lock(shared)
    try:
        err = _error(capsys, "train", *_args(synth_dir, data_cache, tmp_path / "b", "train.max_steps=1",
                                             f"checkpoint.dir={shared}"))
        assert f"{shared} is in use by astra-ds pid {holder.pid}" in err and "choose another checkpoint.dir" in err
        assert not (tmp_path / "b" / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


def test_resume_auto_finds_checkpoints_by_scanning_not_by_latest(saved_run, synth_dir, data_cache, tmp_path,
                                                                  caplog):
    caplog.set_level(logging.INFO, logger="astra_ds")
    run = _copy(saved_run, tmp_path)
    checkpoints = run / "checkpoints"
    (checkpoints / "latest").unlink()
    shutil.copytree(checkpoints / "global_step2", checkpoints / "global_step30_backup")  # a copy someone kept
    run_main("train", "--no-eval", "--resume", "auto", *_args(synth_dir, data_cache, run, "train.max_steps=6",
                                                              *SAVED))
    assert "resumed from" in caplog.text and "global_step4 (step 4" in caplog.text
    (checkpoints / "latest").write_bytes(b"\xffgarbage")
    run_main("train", "--no-eval", "--resume", "auto", *_args(synth_dir, data_cache, run, "train.max_steps=8",
                                                              *SAVED))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["global_step30_backup", "global_step6", "global_step8",
                                                             "latest"]
    assert (checkpoints / "latest").read_text() == "global_step8"


def test_resume_checks_meta_the_data_and_the_settings(saved_run, synth_dir, data_cache, tmp_path, capsys, caplog):
    from astra_ds.data.synth import SynthConfig, generate

    run = _copy(saved_run, tmp_path)
    meta = run / "checkpoints" / "global_step4" / "meta.json"
    original = meta.read_text()
    meta.write_text(original.replace('"world_size": 1', '"world_size": 2'))
    resume = ["train", "--resume", str(meta.parent)]
    assert "global_step4 is damaged (meta.json changed since it was written)" in _error(
        capsys, *resume, *_args(synth_dir, data_cache, run, "train.max_steps=6", *SAVED))
    meta.write_text(original)
    other = generate(SynthConfig(num_labels=50, num_train=512, num_test=128, vocab_size=500, seed=2),
                     tmp_path / "other")  # the same shape, other queries
    assert "was trained on other data than" in _error(
        capsys, *resume, *_args(other, data_cache, run, "train.max_steps=6", *SAVED))
    changed = _args(synth_dir, data_cache, run, "train.max_steps=6", *SAVED, "train.batch_size=16",
                    "train.log_every=2")
    err = _error(capsys, *resume, *changed)
    assert "with other settings than it was trained with (train.batch_size 32 -> 16)" in err
    assert "--allow-changes" in err
    caplog.set_level(logging.INFO, logger="astra_ds")
    run_main(*resume, "--no-eval", "--allow-changes", *changed)
    assert "with changed settings: " in caplog.text and all(
        change in caplog.text for change in ("train.batch_size 32 -> 16", "train.log_every 1 -> 2", "out_dir "))


def test_a_setting_newer_than_the_checkpoint_is_compared_with_its_default(tmp_path):
    """A checkpoint written before a setting existed trained with its default: resuming with another value is a
    change like any other."""
    from astra_ds.config import RunConfig
    from astra_ds.errors import CheckpointError
    from astra_ds.training.start import check_resumable

    cfg = RunConfig().with_absolute_paths()
    older = cfg.to_dict()
    del older["negatives"]["num_negatives"]  # as if written before negatives.num_negatives existed
    meta = {"config": older}
    check_resumable(meta, tmp_path, cfg, "data", allow_changes=False)
    cfg.negatives.num_negatives += 1
    with pytest.raises(CheckpointError, match=r"negatives.num_negatives \d+ -> \d+"):
        check_resumable(meta, tmp_path, cfg, "data", allow_changes=False)


def test_one_damaged_file_never_disables_every_checkpoint_kept(synth_dir, data_cache, tmp_path):
    """keep_last = 2: every checkpoint a full copy (keep_last 3 and more: see the test of the chains below)."""
    out = tmp_path / "run"
    for steps in (3, 4):
        run_main("train", "--no-eval", *(["--resume", "auto"] if steps > 3 else []), *_args(
            synth_dir, data_cache, out, f"train.max_steps={steps}", "checkpoint.save_every=1",
            "table.chunk_mb=0.0005", "train.epochs=5"))
        inodes = [{os.stat(f).st_ino for f in p.rglob("*") if f.is_file()} for p in (out / "checkpoints").glob("g*")]
        assert len(inodes) == 2 and not inodes[0] & inodes[1]


def test_linked_checkpoints_come_in_chains_that_the_kept_ones_always_span(tmp_path):
    from astra_ds.config import CheckpointConfig
    from astra_ds.rundir.run_dir import RunDir
    from astra_ds.training.checkpoint import CheckpointManager

    class Files:  # a component with files, recording what its chunks were linked to
        def __init__(self):
            self.linked_to = []

        def save_files(self, directory, previous):
            (directory / "chunk").write_text("rows")
            self.linked_to.append(previous.parent.name if previous else None)

    for keep_last, expected in ((1, [None, "global_step1", "global_step2", "global_step3", "global_step4"]),
                                (2, [None] * 5),
                                (3, [None, "global_step1", None, "global_step3", None]),
                                (4, [None, "global_step1", "global_step2", None, "global_step4"])):
        files = Files()
        manager = CheckpointManager(CheckpointConfig(keep_last=keep_last), RunDir(tmp_path / str(keep_last)), 0, 1)
        manager.register("table", files)
        for step in range(1, 6):
            manager.save(step, {"step": step})
        assert files.linked_to == expected, keep_last
        kept = [int(p.name.removeprefix("global_step")) for p in manager.dir.glob("global_step*")]
        assert len(kept) == keep_last


def test_a_malicious_pickle_in_a_run_or_checkpoint_is_refused_not_run(saved_run, synth_dir, data_cache, tmp_path,
                                                                      capsys):
    from astra_ds.digests import manifest

    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = _copy(saved_run, tmp_path)
    weights = torch.load(run / "encoder.pt", weights_only=True)
    torch.save(weights | {"payload": Payload()}, run / "encoder.pt")
    digests = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps(digests | manifest(run, ["encoder.pt"])))  # digests that match
    err = _error(capsys, "predict", "--run-dir", str(run), "--text", "a b")
    assert "encoder.pt holds posix.system, not only tensors: refused" in err

    checkpoint = run / "checkpoints" / "global_step4"
    for name in ("state.pt", "encoder/zero/zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        state = torch.load(checkpoint / name, weights_only=False)
        torch.save({"state": state, "payload": Payload()}, checkpoint / name)
        meta = json.loads((checkpoint / "meta.json").read_text())
        rewrite_meta(checkpoint, digests=meta["digests"] | manifest(checkpoint, [name]))
        err = _error(capsys, "train", "--resume", str(checkpoint), *_args(synth_dir, data_cache, run,
                                                                           "train.max_steps=6", *SAVED))
        assert f"{name} holds posix.system, not only tensors: refused" in err
        shutil.rmtree(checkpoint)
        shutil.copytree(saved_run / "checkpoints" / "global_step4", checkpoint)
    assert not marker.exists()


# ---- user mistakes and edge cases end in one line or a right answer --------------------------------------------

def test_predict_takes_no_texts_crlf_and_refuses_what_is_not_utf8(saved_run, tmp_path, capsys, monkeypatch):
    import io

    model = astra_ds.load(saved_run)
    empty = model.predict([], k=3)
    assert empty.ids.shape == (0, 3) and empty.scores.shape == (0, 3) and empty.names == []

    def predict_stdin(data: bytes, *args: str) -> int:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        capsys.readouterr()
        return main(["predict", "--run-dir", str(saved_run), "--input", "-", *args])

    assert predict_stdin(b"") == 0 and capsys.readouterr().out == ""
    (tmp_path / "empty.txt").write_text("")
    run_main("predict", "--run-dir", str(saved_run), "--input", str(tmp_path / "empty.txt"), "--out",
             str(tmp_path / "new" / "none.jsonl"))
    assert (tmp_path / "new" / "none.jsonl").read_text() == ""
    assert predict_stdin(b"a b\r\nb c\r\n") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == ["a b", "b c"]
    assert lines[0]["ids"] == model.predict(["a b"], k=5).ids[0].tolist()
    assert predict_stdin(b"a b\nb \xff c\n") == 2
    assert capsys.readouterr().err == ("astra-ds: error: -, line 2: not UTF-8 (byte 3: b'\\xff'); convert it to UTF-8 "
                                       "first\n")


def test_wrong_paths_are_refused_before_the_model_or_the_libraries_load(saved_run, synth_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert f"cannot write {afile / 'out.jsonl'}: {afile} is not a writable directory" in _error(
        capsys, "predict", "--run-dir", str(saved_run), "--text", "a", "--out", str(afile / "out.jsonl"))
    assert f"cannot write {afile / 'e' / 'metrics.json'}" in _error(
        capsys, "eval", "--run-dir", str(saved_run), "--out-dir", str(afile / "e"))
    probe = ("import sys; from astra_ds.cli.main import main; status = main(sys.argv[1:]); "
             "print(status, sorted({'torch', 'transformers', 'deepspeed'} & set(sys.modules)))")
    for args, expected in ((["predict", "--run-dir", str(tmp_path / "nope"), "--text", "a"], "no run at"),
                           (["export", "--run-dir", str(tmp_path), "--out", str(tmp_path / "x")],
                            "is not a finished run"),
                           (["train", "--set", f"data.path={tmp_path / 'nodata'}"], "is not a directory"),
                           (["train", "--resume", str(tmp_path / "gone"), "--set", f"data.path={synth_dir}"],
                            "--resume: no checkpoint at")):
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=REPO,
                                env=fresh_process_env(), timeout=120)
        assert result.stdout.strip() == "2 []" and expected in result.stderr, (args, result.stderr)


def test_synth_into_an_existing_folder_and_an_empty_test_split_are_one_line(synth_dir, data_cache, tmp_path,
                                                                           capsys):
    assert f"{synth_dir} already exists: choose a new directory" in _error(capsys, "data", "synth", "--out",
                                                                           str(synth_dir))
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    (data / "tst_X.txt").write_text("")
    (data / "tst_X_Y.txt").write_text("0 50\n")
    out = tmp_path / "run"
    assert "has no test queries, so the model could not be evaluated: train with --no-eval" in _error(
        capsys, "train", *_args(data, data_cache, out, "train.max_steps=1"))
    assert not (out / "config.yaml").exists()  # refused before anything was trained or written
    run_main("train", "--no-eval", *_args(data, data_cache, out, "train.max_steps=1"))


def test_a_full_disk_while_saving_the_model_is_said_as_such(synth_dir, data_cache, tmp_path, monkeypatch):
    import astra_ds.training.publish as publish_module
    from astra_ds.errors import UserError

    trainer = make_trainer(synth_dir, data_cache, tmp_path, "negatives.strategy=uniform", "batching.mode=random",
                           "train.max_steps=1")
    trainer.fit()
    _fill_the_disk(monkeypatch, publish_module, "basic_ios::clear: iostream error")
    with pytest.raises(UserError, match=r"the disk is full: saving the model into .* failed \(0 bytes free\); its "
                                        r"last checkpoint is intact"):
        trainer.save_model()
    assert not (tmp_path / "manifest.json").exists()


def test_finalize_publishes_a_checkpoint_of_a_run_that_did_not_finish(saved_run, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    for name in ("manifest.json", "model.json", "encoder.pt", "metrics.json"):  # killed before its model was saved
        (run / name).unlink()
    shutil.rmtree(run / "table")
    assert "is not a finished run" in _error(capsys, "predict", "--run-dir", str(run), "--text", "a b")
    run_main("finalize", "--run-dir", str(run), "--no-eval")
    texts = ["a b", "b c d"]
    expected, published = astra_ds.load(saved_run).predict(texts, k=3), astra_ds.load(run).predict(texts, k=3)
    assert published.ids.tolist() == expected.ids.tolist() and astra_ds.load(run).card.step == 4
    np.testing.assert_allclose(published.scores, expected.scores, rtol=1e-5)
    assert sorted(p.name for p in (run / "checkpoints").glob("global_step*")) == ["global_step2", "global_step4"]
    run_main("finalize", "--run-dir", str(run), "--checkpoint", str(run / "checkpoints" / "global_step2"))
    assert astra_ds.load(run).card.step == 2 and json.loads((run / "metrics.json").read_text())["step"] == 2
