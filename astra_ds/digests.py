"""Content digests of the files of a checkpoint or a finished run, written when they are saved and checked when
they are loaded: a damaged, truncated or missing file is found before it is trained on or evaluated.

A manifest maps each file (path relative to its directory) to the BLAKE2b digest of its bytes. Unchanged table
chunks are links to the previous checkpoint's files: their digests are taken from a cache keyed by the file's
identity (device, inode, size, modification time) instead of being read again. Files are digested on several
threads (hashlib lets go of the GIL): a checkpoint's table is many chunk files, and one core hashes ~0.5 GB/s.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCK = 1 << 20
THREADS = min(8, os.cpu_count() or 1)


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """Digests of files already read, by file identity (a hard link shares its source's)."""

    def __init__(self):
        self.known: dict[tuple, str] = {}

    def digest(self, path: Path) -> str:
        stat = os.stat(path)
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in self.known:
            self.known[key] = file_digest(path)
        return self.known[key]

    def digests(self, paths: list[Path]) -> list[str]:
        """The digest of each of `paths`, in order; read on up to THREADS threads."""
        if len(paths) < 2 or THREADS == 1:
            return [self.digest(path) for path in paths]
        with ThreadPoolExecutor(min(THREADS, len(paths))) as pool:
            return list(pool.map(self.digest, paths))


def manifest(directory: Path, files: list[str], cache: DigestCache | None = None) -> dict[str, str]:
    cache = cache or DigestCache()
    return dict(zip(files, cache.digests([directory / name for name in files])))


def damaged_files(directory: Path, digests: dict[str, str], cache: DigestCache | None = None) -> list[str]:
    """The files of `digests` that are missing under `directory` or whose bytes changed."""
    cache = cache or DigestCache()
    present = [name for name in digests if (directory / name).is_file()]
    found = dict(zip(present, cache.digests([directory / name for name in present])))
    return [name for name, expected in digests.items() if found.get(name) != expected]


def listed(names: list[str]) -> str:
    """The first three of `names` and how many more, for a one-line message."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
