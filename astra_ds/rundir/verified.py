"""A finished run's digests checked once per model version, not on every load: verifying reads every byte of the
model (the whole table: minutes at 10^8 rows), and a server reloading or a user calling `predict` loads the same
run again and again.

Once a run verifies, the identity of its manifest and of each file it lists (device, inode, size, modification
and change times) is recorded in the user's cache (`$ASTRA_DS_CACHE`, else `$XDG_CACHE_HOME/astra_ds`, else
`~/.cache/astra_ds`). A later load whose files all have the recorded identities skips the reading. A write to a
file moves its change time, which no user tool sets back, and a copy is another inode: either is read again. A
cache that cannot be written only costs the reading."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from astra_ds.digests import DigestCache
from astra_ds.errors import UserError
from astra_ds.files import user_cache_dir, write_atomically

log = logging.getLogger("astra_ds")


def _record_path(run_dir: Path) -> Path:
    key = hashlib.blake2b(str(run_dir.resolve()).encode(), digest_size=16).hexdigest()
    return user_cache_dir() / "verified" / f"{key}.json"


def _identities(run_dir: Path, names: list[str]) -> dict[str, list[int]]:
    identities = {}
    for name in names:
        stat = os.stat(run_dir / name)
        identities[name] = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    return identities


def already_verified(run_dir: Path, names: list[str]) -> bool:
    """Whether the files `names` of `run_dir` (its manifest among them) are the ones verified last time."""
    try:
        return json.loads(_record_path(run_dir).read_text()) == _identities(run_dir, names)
    except (OSError, ValueError):
        return False


def remember_verified(run_dir: Path, names: list[str]) -> None:
    path = _record_path(run_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(_identities(run_dir, names)))
    except (OSError, UserError) as err:  # a full disk included: remembering is an optimisation, never a failure
        log.debug("the verification of %s is not remembered: %s", run_dir, err)


def known_digests(run_dir: Path, digests: dict[str, str]) -> DigestCache:
    """The digests (a manifest's) of the files still as they were when the run was last verified: a change to the
    run (`astra-ds labels`) then digests only the files it wrote for its new manifest."""
    cache = DigestCache()
    try:
        record = json.loads(_record_path(run_dir).read_text())
        for name, digest in digests.items():
            if name in record and _identities(run_dir, [name])[name] == record[name]:
                cache.known[tuple(record[name][:4])] = digest  # DigestCache's key: device, inode, size, mtime
    except (OSError, ValueError):
        pass
    return cache
