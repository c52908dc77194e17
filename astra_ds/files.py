"""Files of runs and checkpoints: durable writes (a file replaced atomically: temporary file, fsync, rename; trees
flushed to disk), the files under a directory (what a manifest of digests lists), and torch files read back with
damage named in one line (for the trainer and for serving alike)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from astra_ds import layout
from astra_ds.errors import CheckpointError


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, and the directories themselves, to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(Path(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """`path` holds `text`, or (after a crash at any point) its old content: never a part."""
    tmp = path.with_name(path.name + layout.TMP_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def files_under(path: Path) -> list[str]:
    """Every file below `path`, as sorted paths relative to it."""
    return sorted(str(Path(root, name).relative_to(path)) for root, _, files in os.walk(path) for name in files)


def load_torch_file(path: Path):
    """torch.load of a file this project wrote, with a damaged or truncated file named in one line."""
    import torch

    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise CheckpointError(f"{path} is damaged or truncated ({str(err).splitlines()[0][:120]})") from None
