"""One run at a time in a run directory, and in a checkpoint directory set apart from it (checkpoint.dir): an
exclusive lock (fcntl.flock on <directory>/.lock) held by rank 0 for the life of the process. The operating system releases it when the process dies, so a crashed or killed run
never leaves a stale lock; the file names the holder for the message a second run gets."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from astra_ds.errors import UserError


LOCK_FILE = ".lock"
_HELD: dict[Path, "RunLock"] = {}  # the locks this process holds, by directory


class RunLock:
    """A trainer built again in the same process (a notebook, the tests) takes over the lock of the earlier one."""

    def __init__(self, run_dir: Path, key: str = "out_dir"):
        """`key`: the config key that names the directory, for the messages."""
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"{key} {run_dir} is a file, not a directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.key = run_dir.resolve()
        if self.key in _HELD:
            _HELD.pop(self.key).release()
        self.file = open(run_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"{run_dir} is in use by {holder}: wait for it to end, or choose another {key}") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"astra-ds pid {os.getpid()} on {socket.gethostname()} since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()
        _HELD[self.key] = self

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
        if _HELD.get(self.key) is self:
            del _HELD[self.key]
