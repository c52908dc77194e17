"""Training metrics: JSONL file and TensorBoard scalars, written by rank 0 only; and, when the DeepSpeed config
enables its monitor section (W&B, CSV, Comet, TensorBoard), the same scalars through DeepSpeed's monitor, named
astra_ds/<key>."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import numpy as np

from astra_ds.files import write_atomically
from astra_ds.rundir.run_dir import RunDir

log = logging.getLogger("astra_ds")


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The log's lines of steps <= `step`; lines that do not parse (a line torn by a crash) are dropped."""
    kept, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            torn += 1
    if torn:
        log.warning("%s: %d unreadable line(s) dropped (torn by a crash?)", path, torn)
    return kept


class MetricsLog:
    def __init__(self, run: RunDir, enabled: bool, resumed_step: int | None = None, monitor=None):
        """A run resumed from the checkpoint of `resumed_step` keeps the log lines up to that step (the lines
        after it belong to steps the resumed run does again) and appends. `monitor`: DeepSpeed's (engine.monitor),
        used when its config enables it."""
        self.enabled = enabled
        self.writer = None
        self.monitor = monitor if monitor is not None and monitor.enabled else None
        if not enabled:
            return
        path = run.train_log
        if resumed_step is not None and path.is_file():  # rewritten atomically: a failure leaves it as it was
            write_atomically(path, "".join(line + "\n" for line in _lines_up_to(path, resumed_step)))
            self.file = open(path, "a")
        else:
            self.file = open(path, "w")
        self.writer = TensorBoardScalars(run.tensorboard)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.file.flush()
        scalars = {key: value for key, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if scalars:
            self.writer.add(step, scalars)
        if self.monitor is not None and scalars:
            self.monitor.write_events([(f"astra_ds/{key}", value, step) for key, value in scalars.items()])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.writer.close()


class TensorBoardScalars:
    """Scalars as TensorBoard event records, written and flushed in the caller's thread: TensorBoard's own writer
    writes from a thread of its own, which on a full disk printed a traceback rather than an error. A failed write
    stops the scalars with one warning (the run goes on; train_log.jsonl has the same figures)."""

    def __init__(self, directory: Path):
        self.directory, self.file, self.records, self.stopped = directory, None, None, False

    def add(self, step: int, scalars: dict[str, float]) -> None:
        if self.stopped:
            return
        from tensorboard.compat.proto.event_pb2 import Event  # here, not at start-up: 0.5 s of imports
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter

        try:
            if self.records is None:  # the file of this process, opened at its first scalars
                self.directory.mkdir(parents=True, exist_ok=True)
                name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
                self.file = open(self.directory / name, "ab")
                self.records = RecordWriter(self.file)
                self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
            values = [Summary.Value(tag=key, simple_value=value) for key, value in scalars.items()]
            self._write(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        except OSError as err:
            log.warning("TensorBoard scalars stop here, at step %d: %s (train_log.jsonl goes on)", step, err)
            self.stopped = True

    def _write(self, event) -> None:
        self.records.write(event.SerializeToString())
        self.records.flush()

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass


class StepWindow:
    """The steps since the last log line: their mean loss and throughput, evaluations left out."""

    def __init__(self):
        self.losses, self.started = [], time.time()

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def pause(self, seconds: float) -> None:
        """`seconds` spent on something else (an evaluation) do not count."""
        self.started += seconds

    def close(self, batch_size: int) -> dict:
        """The window's figures; the next window starts."""
        elapsed = time.time() - self.started
        values = {"loss": float(np.mean(self.losses)), "steps_per_s": len(self.losses) / elapsed,
                  "queries_per_s": len(self.losses) * batch_size / elapsed}
        self.losses, self.started = [], time.time()
        return values
