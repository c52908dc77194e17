"""Faults at the write points of a command, in the manner of SQLite's crash and I/O-error tests.

Every operation by which the process changes the disk is a write point: a file opened for writing, a rename, a
link, a directory made, and the native writers (torch.save, faiss.write_index). Armed with a kind and a number N,
the N-th write point

    full    fails as on a full disk (ENOSPC), and so does every write after it (removing files still works, as
            on a real full disk that a command cleans up after);
    crash   is where the process dies (SIGKILL, the OOM killer, a power cut of a machine whose page cache was
            flushed): the watched directories are imaged as they are on disk at that moment, before the operation,
            and the command is stopped by an exception that no code of the project catches. The image is what
            a kill leaves behind; the next command runs on it;
    signal  delivers SIGTERM there: to the handler a command installed (the trainer's preemption), or, where none
            is, as the crash it then is (the default action ends the process).

`Injector.points` names the write point reached each time (its call site in astra_ds), so that a harness first
counts a command's points, then runs it once for each (`sites`: the first point of each place in the code that
writes, named by its site and occurrence, which stay the same when threads write in another order); `Injector.handled` says for each whether a SIGTERM handler
was on there. With `roots`, only writes under those directories are write points (a shared cache's are not), less
those under `ignore` (a background thread's, such as TensorBoard's writer, come in no fixed order; a full disk
fails them all the same).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import signal
import threading
import traceback
from collections import Counter
from pathlib import Path

WRITE_MODES = set("wax+")
KINDS = ("full", "crash", "signal")


class Crashed(BaseException):
    """The process died at this write point (a BaseException: no `except Exception` of the project stops it)."""


class Injector:
    def __init__(self, kind: str | None = None, at: int | tuple[str, int] = 0,
                 images: dict[Path, Path] | None = None, roots: tuple[Path, ...] = (), ignore: tuple[Path, ...] = ()):
        """`kind` at the `at`-th write point (1-based), or at the n-th point of a site (site, n); none: count the
        points only. `images`: for a crash, the directories to image (source -> where its image goes)."""
        assert kind is None or kind in KINDS, kind
        self.kind, self.at, self.images = kind, at, images or {}
        self.roots = tuple(Path(root).absolute() for root in roots)
        self.ignored = tuple(Path(path).absolute() for path in ignore)
        self.points: list[str] = []  # the call site of each write point reached
        self.handled: list[bool] = []  # whether a SIGTERM handler was on at each
        self.occurrences: Counter = Counter()  # points reached at each site
        self.full = False  # the disk is full (from the `full` fault on)
        self.quiet = False  # imaging: its own writes are no write points
        self.lock = threading.RLock()
        self.saved: dict = {}

    def point(self, what: str, path) -> None:
        with self.lock:
            if self.quiet:
                return
            if not self._watched(path):
                if self.full:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                return
            site = f"{what} at {_call_site()}"
            self.points.append(site)
            self.handled.append(callable(signal.getsignal(signal.SIGTERM)))
            self.occurrences[site] += 1
            hit = len(self.points) == self.at if isinstance(self.at, int) else (site, self.occurrences[site]) == self.at
            if self.kind == "full" and (hit or self.full):
                self.full = True
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            if not hit:
                return
            if self.kind == "signal" and callable(signal.getsignal(signal.SIGTERM)):
                os.kill(os.getpid(), signal.SIGTERM)
            elif self.kind in ("crash", "signal"):
                self.image()
                raise Crashed(self.points[-1])

    def _watched(self, path) -> bool:
        if not (self.roots or self.ignored):
            return True
        if not isinstance(path, (str, bytes, os.PathLike)):
            return not self.roots
        path = Path(os.fsdecode(path)).absolute()

        def under(directories) -> bool:
            return any(path == directory or directory in path.parents for directory in directories)

        return (not self.roots or under(self.roots)) and not under(self.ignored)

    def image(self) -> None:
        self.quiet = True
        try:
            for source, target in self.images.items():
                if source.exists():
                    shutil.copytree(source, target, symlinks=True)
        finally:
            self.quiet = False

    # ---- arming: the write operations of this process patched ---------------------------------------------------

    def __enter__(self) -> "Injector":
        import faiss
        import torch

        def watch(owner, name, what, path_of=lambda *args, **kwargs: args[0] if args else None, when=None):
            original = getattr(owner, name)
            self.saved[(owner, name)] = original

            def patched(*args, **kwargs):
                if when is None or when(*args, **kwargs):
                    self.point(what, path_of(*args, **kwargs))
                return original(*args, **kwargs)

            setattr(owner, name, patched)

        def opens_for_writing(file, mode="r", *args, **kwargs):
            return isinstance(file, (str, bytes, os.PathLike)) and bool(WRITE_MODES & set(mode))

        def os_open_writes(path, flags, *args, **kwargs):
            return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

        watch(builtins, "open", "open", when=opens_for_writing)
        watch(io, "open", "open", when=opens_for_writing)
        watch(os, "open", "os.open", when=os_open_writes)
        for name in ("replace", "rename", "link", "symlink", "mkdir"):
            watch(os, name, name)
        watch(torch, "save", "torch.save", path_of=lambda obj, f, *a, **k: f)
        watch(faiss, "write_index", "faiss.write_index", path_of=lambda index, f, *a, **k: f)
        real_usage = shutil.disk_usage
        self.saved[(shutil, "disk_usage")] = real_usage
        shutil.disk_usage = lambda path: (shutil._ntuple_diskusage(10**9, 10**9, 0) if self.full
                                          else real_usage(path))
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), original in self.saved.items():
            setattr(owner, name, original)
        self.saved.clear()


def sites(points: list[str], where: list[bool] | None = None) -> list[tuple[str, int]]:
    """The first point of each site (among the points `where` holds) as (site, occurrence), in the order reached."""
    seen, chosen = set(), []
    for index, site in enumerate(points):
        if site not in seen and (where is None or where[index]):
            seen.add(site)
            chosen.append(point_at(points, index))
    return chosen


def point_at(points: list[str], index: int) -> tuple[str, int]:
    """The point `points[index]` as (site, occurrence)."""
    index %= len(points)
    return points[index], points[:index + 1].count(points[index])


def _call_site() -> str:
    """The innermost frame of astra_ds that led here: where the write point is in the code."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if f"{os.sep}astra_ds{os.sep}" in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "elsewhere"


def crash(command, directory: Path, at, ignore: tuple[Path, ...] = ()) -> None:
    """`command()` killed at write point `at` of `directory`: the directory is then as the kill left it."""
    image = directory.with_name(directory.name + ".image")
    try:
        with Injector("crash", at, {directory: image}, roots=(directory,), ignore=ignore):
            command()
    except Crashed:
        pass
    else:
        raise AssertionError(f"the command ended before its write point {at}")
    shutil.rmtree(directory, ignore_errors=True)
    if image.exists():
        image.rename(directory)


def temporary_files(*directories: Path) -> list[str]:
    """What an interrupted write leaves under `directories` (NAME.tmp..., NAME.partial)."""
    return [str(p) for d in directories if d.exists() for p in d.rglob("*") if ".tmp" in p.name or ".partial" in p.name]


def one_line(capsys, status: int) -> str:
    """The last line a failed command said: one line, exit status 2."""
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err and err[-1].startswith("astra-ds: error: "), err[-5:]
    return err[-1]
