"""What `astra-ds serve` is started with: the command line's defaults are these (this module imports nothing
heavy, so that the CLI answers at once)."""

from __future__ import annotations

from dataclasses import dataclass, field

from astra_ds.serve.requests import Limits


@dataclass
class ServeSettings:
    run_dir: str
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the log says which)
    max_batch: int = 64  # texts a model batch
    max_wait_ms: float = 0.0  # the longest a request waits for others while the model is idle
    max_queue: int = 1024  # texts waiting for the model; beyond them, 503 with Retry-After
    limits: Limits = field(default_factory=Limits)
    overrides: list[str] = field(default_factory=list)  # config keys for the loaded run, e.g. index.nprobe=64
    device: str | None = None
    drain_s: float = 30.0  # the longest SIGTERM waits for requests in flight
