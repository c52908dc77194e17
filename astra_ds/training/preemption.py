"""Preemption: on SIGTERM (what SLURM and Kubernetes send before a kill) or SIGINT, every rank finishes its
current step, the run writes a checkpoint and exits with the signal's status (128 + signal number); a second
signal aborts at once."""

from __future__ import annotations

import logging
import os
import signal
import threading

from astra_ds.collectives import min_across_ranks

log = logging.getLogger("astra_ds")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    def __init__(self):
        self.signum: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: abort now
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s received: finishing the step, then a checkpoint and exit (send it again to abort now)",
                    signal.Signals(signum).name)

    def requested(self) -> int | None:
        """The signal any rank received (collective: every rank stops at the same step)."""
        signum = -min_across_ranks(-(self.signum or 0))
        return int(signum) or None

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
