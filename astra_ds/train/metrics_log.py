"""Training metrics: JSONL file and TensorBoard scalars, written by rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, resumed_step: int | None = None):
        """A run resumed from the checkpoint of `resumed_step` keeps the log lines up to that step (the lines
        after it belong to steps the resumed run does again) and appends."""
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        path = run_dir / "train_log.jsonl"
        kept = []
        if resumed_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resumed_step]
        self.file = open(path, "w")
        self.file.writelines(line + "\n" for line in kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.writer = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
