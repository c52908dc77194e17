"""Files of runs and checkpoints: durable writes (a file replaced atomically: temporary file, fsync, rename; trees
flushed to disk), the files under a directory (what a manifest of digests lists), torch files read back with
damage named in one line (for the trainer and for serving alike), and users' text files read as UTF-8 lines.

A run directory or checkpoint may come from someone else, and unpickling can run any code: torch files are read
with `weights_only=True` (tensors and plain containers), and files that a library reads itself (DeepSpeed's ZeRO
files) are scanned for the globals their pickles name before the library opens them."""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from astra_ds.digests import listed
from astra_ds.errors import CheckpointError, UserError

TMP_SUFFIX = ".tmp"  # a file or directory being written, renamed to its name once complete


def utf8_lines(data: bytes, source: str) -> list[str]:
    """The lines of a user's text file (a line ends at LF, CRLF or CR), a line that is not
    UTF-8 refused in one line naming it."""
    lines = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise UserError(f"{source}, line {number}: not UTF-8 (byte {err.start + 1}: {raw[err.start:err.start + 1]!r}"
                            "); convert it to UTF-8 first") from None
    return lines


def user_cache_dir() -> Path:
    """astra_ds's cache on this machine: $ASTRA_DS_CACHE, else $XDG_CACHE_HOME/astra_ds (~/.cache/astra_ds)."""
    if os.environ.get("ASTRA_DS_CACHE"):
        return Path(os.environ["ASTRA_DS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "astra_ds"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on the file `path` (created if missing): a process that finds it held waits, on this
    host or, where the file system supports flock (local disks, NFSv4), on any."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, and the directories themselves, to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            fsync_path(Path(root, name))
        fsync_path(Path(root))


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """`path` holds `text`, or (after a crash or a full disk at any point) its old content: never a part."""
    with output_file(path, TMP_SUFFIX) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    fsync_path(path.parent)


@contextmanager
def output_file(path: Path, suffix: str | None = None) -> Iterator[Path]:
    """A file written whole or not at all: the caller writes the temporary path this yields (beside `path`, named
    `suffix` after it, or NAME.tmp.EXT so that libraries that add an extension find theirs), renamed to `path`
    once complete. On an error the temporary file goes, and a full disk is said in one line naming `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix if suffix else f"{path.stem}{TMP_SUFFIX}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)) and disk_full(err, path.parent):
            raise UserError(f"the disk is full: writing {path} failed ({shutil.disk_usage(path.parent).free} bytes "
                            "free); it was left as it was") from None
        raise


def disk_full(err: BaseException, directory: Path) -> bool:
    """Whether `err`, an OSError or a library's RuntimeError (torch and zarr say a full disk as an iostream error),
    came from a full disk under `directory`."""
    return getattr(err, "errno", None) == errno.ENOSPC or shutil.disk_usage(directory).free < 2**20


def files_under(path: Path) -> list[str]:
    """Every file below `path`, as sorted paths relative to it."""
    return sorted(str(Path(root, name).relative_to(path)) for root, _, files in os.walk(path) for name in files)


def load_torch_file(path: Path):
    """torch.load of a file this project wrote (tensors and plain containers only), with a damaged or truncated
    file named in one line, and one that holds anything else refused as such."""
    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            check_only_tensors(path)
        raise CheckpointError(f"{path} is damaged or truncated ({str(err).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path} is damaged or truncated ({str(err).splitlines()[0][:120]})") from None


def check_only_tensors(path: Path, allowed: Callable[[str], bool] = lambda name: False) -> None:
    """Refuses the torch file `path` when its pickle names a global beyond tensors and plain containers (one that
    could run code as it is unpickled), unless `allowed(name)`; read without unpickling anything."""
    import torch

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path} is damaged or truncated ({str(err).splitlines()[0][:120]})") from None
    refused = [name for name in unsafe if not allowed(name)]
    if refused:
        raise CheckpointError(f"{path} holds {listed(refused)}, not only tensors: refused, as loading it could run "
                              "code (was it written by astra_ds?)")
