"""Readable output: the long phases report progress with the time left when no terminal shows a bar; what native
code prints (faiss's clustering warnings, DeepSpeed's op builds) is summarised into the log, not repeated on the
console; the training's scalars reach TensorBoard, and DeepSpeed's monitor when its config enables one (tested with
the CSV one)."""

import csv
import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from astra_ds.config import IndexConfig, TableConfig
from astra_ds.index.label_index import LabelIndex
from astra_ds.libraries import native_output_logged
from astra_ds.progress import duration, progress
from astra_ds.table.table import ClassifierTable
from conftest import TINY_RUN, run_cli


def test_long_phases_log_their_progress_and_the_time_left_without_a_terminal(monkeypatch, caplog):
    import astra_ds.progress as progress_module

    caplog.set_level(logging.INFO, logger="astra_ds")
    monkeypatch.setattr(progress_module, "LOG_SECONDS", 0.0)  # a line after every item
    assert list(progress(range(4), "encode", unit="batch")) == [0, 1, 2, 3]
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("encode: 1/4 batch (25%), ") and lines[0].endswith("s left")
    assert len(lines) == 4 and lines[-1].startswith("encode: 4 batch in ")
    assert list(progress(range(3), "quiet", enabled=False)) == [0, 1, 2] and len(caplog.records) == 4
    assert (duration(42), duration(90), duration(5400)) == ("42 s", "1 min 30 s", "1 h 30 min")


def test_native_output_goes_to_the_log_once_a_line_with_its_count(caplog):
    caplog.set_level(logging.INFO, logger="astra_ds")
    with native_output_logged("library"):
        for _ in range(3):
            os.write(2, b"WARNING the same line\n")
        os.write(1, b"built successfully\n")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["library: WARNING the same line (x3)", "library: built successfully"]


def test_an_ivf_pq_index_over_few_rows_builds_and_says_its_warnings_once(caplog):
    caplog.set_level(logging.INFO, logger="astra_ds")
    table = ClassifierTable(50, 16, TableConfig())
    table.init_random(0)
    index = LabelIndex(IndexConfig(kind="ivf_pq", nlist=4, nprobe=4, pq_m=4), normalize_rows=True)
    assert index.build(table, np.random.default_rng(0)).rows == 50  # 256 codes a sub-vector would need 256 rows
    queries = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert index.recall(table, queries, 5) >= 0.5
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("faiss training (ivf_pq)")]
    assert warnings and all(message.count("please provide at least") == 1 for message in warnings)


def test_training_scalars_reach_deepspeed_s_csv_monitor_and_its_build_lines_stay_off_stdout(synth_dir, data_cache,
                                                                                          tmp_path):
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "zero_optimization": {"stage": 2},
        "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "job"}}))
    out = tmp_path / "run"
    result = run_cli("train", "--no-eval", *[arg for override in (
        *TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={out}", "train.max_steps=8",
        f"train.ds_config={ds_config}", "eval.ann_index=false") for arg in ("--set", override)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DeepSpeed" not in result.stdout and "ld returned" not in result.stdout + result.stderr
    logged = {json.loads(line)["step"]: json.loads(line)["loss"]
              for line in (out / "train_log.jsonl").read_text().splitlines() if "loss" in line}
    with open(tmp_path / "monitor" / "job" / "astra_ds_loss.csv") as f:
        monitored = {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}
    assert monitored == logged and sorted(monitored) == [4, 8]


def test_tensorboard_scalars_are_read_back_and_a_full_disk_stops_them_with_one_warning(tmp_path, caplog,
                                                                                       monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from astra_ds.training import metrics_log

    scalars = metrics_log.TensorBoardScalars(tmp_path / "tb")
    scalars.add(1, {"loss": 2.5, "lr": 0.1})
    scalars.add(2, {"loss": 1.5})
    scalars.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 1.5)]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("lr")] == [(1, 0.1)]

    full = metrics_log.TensorBoardScalars(tmp_path / "full")  # its events file on a full disk
    monkeypatch.setattr(metrics_log, "open", lambda path, mode: open("/dev/full", mode), raising=False)
    with caplog.at_level(logging.WARNING, logger="astra_ds"):
        full.add(1, {"loss": 2.5})
        full.add(2, {"loss": 1.5})  # stopped: no second warning
    assert caplog.text.count("TensorBoard scalars stop here, at step 1: [Errno 28] No space left on device") == 1
    full.close()
