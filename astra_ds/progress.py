"""Progress of the long phases (tokenising, encoding, top-k, index builds, saving and loading tables): a bar on a
terminal; elsewhere (CI, nohup, a cluster's log files, where a bar is noise) a log line every LOG_SECONDS with the
count, the rate and the time left, and one at the end of a phase that took longer than that."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

log = logging.getLogger("astra_ds")
LOG_SECONDS = 30.0
Item = TypeVar("Item")


def progress(items: Iterable[Item], desc: str, enabled: bool = True, unit: str = "it",
             total: int | None = None) -> Iterable[Item]:
    """`items`, reporting progress while they are consumed (`enabled`: on the rank and in the command that shows
    it)."""
    if not enabled:
        return items
    total = total if total is not None else len(items)
    if sys.stderr.isatty():
        return tqdm(items, desc=desc, unit=unit, total=total)
    return _logged(items, desc, unit, total)


def _logged(items: Iterable[Item], desc: str, unit: str, total: int) -> Iterator[Item]:
    started = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= LOG_SECONDS and done < total:
            rate = done / (now - started)
            log.info("%s: %d/%d %s (%.0f%%), %.3g %s/s, about %s left", desc, done, total, unit, 100 * done / total,
                     rate, unit, duration((total - done) / rate))
            last = now
    if time.monotonic() - started >= LOG_SECONDS:
        log.info("%s: %d %s in %s", desc, done, unit, duration(time.monotonic() - started))


def duration(seconds: float) -> str:
    """90 -> "1 min 30 s", 5400 -> "1 h 30 min"."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
