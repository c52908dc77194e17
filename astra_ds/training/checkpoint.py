"""Full-state checkpoints: the components of a run register under a name, and a checkpoint holds each one's
state.

    <checkpoint dir>/global_step<N>/   (checkpoint.dir, else the run directory's checkpoints/)
        meta.json                    step, epoch, the run's id, world size, labels, components, files: read first
        state.pt                     the state every rank shares, a dict component name -> state_dict
        rank<r>.pt                   rank r's own state (RNG streams), same form
        <component>/                 the files of components too large for a state dict
    <checkpoint dir>/latest          the newest checkpoint's name (a hint for people and tools)

A component has `state_dict()` / `load_state_dict()` (small state, tensors and plain values: shared by all ranks,
or per rank), and may have `save_files(directory, previous)` / `load_files(directory, resharded)` for state too
large for a state dict (the DeepSpeed engine's ZeRO shards, the table's zarr chunks, faiss indexes), written into
its own directory `<checkpoint>/<name>/` by every rank, and `load_weights(directory)` for `--init-from`.
Components are loaded in the order they were registered, state before files.

A checkpoint is written as global_step<N>.tmp, fsynced and renamed; then the file `latest` (naming the tag) is
replaced atomically, and checkpoints beyond keep_last are deleted. A crash at any point leaves the previous
checkpoints as they were. meta.json lists the checkpoint's files with their digests, and carries a digest of
itself; a checkpoint missing one of its files, or holding one whose bytes changed, is refused before anything is
built. `--resume auto` scans the directory for global_step<N> checkpoints and takes the newest one that verifies
(`latest` is a hint for people and tools; missing or wrong, it changes nothing). Runs may share a checkpoint
directory one after another: each checkpoint carries its run's id, and a run resumes and prunes only its own.

Unchanged table chunks are reflinks (copy-on-write, where the file system has them) or hard links to the
previous checkpoint's, in chains of at most keep_last - 1 checkpoints, each chain starting with a full copy: the
keep_last checkpoints kept always span two chains, so one damaged file never disables all of them (with
keep_last = 2, every checkpoint is a full copy). A damaged shared file names every checkpoint that holds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from astra_ds.collectives import all_gather_objects, barrier
from astra_ds.config import CheckpointConfig
from astra_ds.digests import DigestCache, damaged_files, listed, manifest
from astra_ds.errors import CheckpointError
from astra_ds.files import (TMP_SUFFIX, disk_full, files_under, fsync_path, fsync_tree, load_torch_file,
                             write_atomically)
from astra_ds.rundir.run_dir import RunDir

log = logging.getLogger("astra_ds")

LATEST = "latest"
META = "meta.json"
SHARED_STATE = "state.pt"
CHECKPOINT_PREFIX = "global_step"


def rank_state(rank: int) -> str:
    return f"rank{rank}.pt"


def checkpoint_tag(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix(CHECKPOINT_PREFIX).removesuffix(TMP_SUFFIX))


def is_checkpoint_tag(name: str) -> bool:
    """global_step<N> exactly: not a save cut short (.tmp), a copy someone made beside it, or anything else."""
    return name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit()


def check_checkpoint(path: Path, cache: DigestCache | None = None) -> dict:
    """The checkpoint's meta.json, or a CheckpointError that says what is wrong: a missing file, or one whose
    digest differs from the one written with it (naming the other checkpoints that share the damaged file)."""
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    if not (path / META).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {META})")
    try:
        meta = json.loads((path / META).read_text())
        files = meta["files"]
    except (json.JSONDecodeError, KeyError, OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable {META}: {err}") from None
    if meta.get("meta_digest") != meta_digest(meta):
        raise CheckpointError(f"checkpoint {path} is damaged ({META} changed since it was written)")
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {listed(missing)})")
    damaged = damaged_files(path, meta.get("digests", {}), cache)
    if damaged:
        sharing = _sharing(path, damaged)
        raise CheckpointError(f"checkpoint {path} is damaged ({listed(damaged)} changed since it was written)"
                              + (f"; the same files are in {', '.join(sharing)}" if sharing else ""))
    return meta


def meta_digest(meta: dict) -> str:
    """The digest of a checkpoint's meta.json, its own digest left out."""
    content = json.dumps({k: v for k, v in meta.items() if k != "meta_digest"}, sort_keys=True)
    return hashlib.blake2b(content.encode(), digest_size=16).hexdigest()


def checkpoints_in(directory: Path) -> list[Path]:
    """The checkpoints in `directory`, newest first."""
    return sorted((p for p in directory.glob(CHECKPOINT_PREFIX + "*")
                   if p.is_dir() and is_checkpoint_tag(p.name)), key=lambda p: step_of(p.name),
                  reverse=True)


def _sharing(path: Path, names: list[str]) -> list[str]:
    """The other checkpoints beside `path` that hold one of its files `names` (a hard link to the same file)."""
    inodes = {os.stat(path / name).st_ino for name in names if (path / name).exists()}
    return sorted(other.name for other in path.parent.glob(CHECKPOINT_PREFIX + "*") if other != path and any(
        (other / name).exists() and os.stat(other / name).st_ino in inodes for name in names))


def convert_encoder_to_universal(directory: Path, tag: str, rank: int) -> str:
    """Convert the ZeRO state `directory/tag` to DeepSpeed's universal format, which loads on any number of ranks
    (rank 0 converts, once: the result stays in the checkpoint); returns the universal tag."""
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    universal = tag + "_universal"
    if rank == 0 and not (directory / universal).is_dir():
        tmp = directory / (universal + TMP_SUFFIX)
        shutil.rmtree(tmp, ignore_errors=True)
        ds_to_universal(SimpleNamespace(input_folder=str(directory / tag), output_folder=str(tmp),
                                        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                        strict=True, inject_missing_state=False))
        os.replace(tmp, directory / universal)
    barrier()
    return universal


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, run: RunDir, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.dir = Path(cfg.dir) if cfg.dir else run.checkpoints
        self.components: dict[str, tuple[object, bool]] = {}  # name -> (component, per rank)
        self.previous: Path | None = None  # the last checkpoint saved or loaded: its unchanged table chunks are linked
        self.chain = 0  # its position in its chain of linked checkpoints
        self.digest_cache = DigestCache()  # linked chunks are not read again to digest them
        self.pinned: set[Path] = set()  # checkpoints kept beyond keep_last (eval.keep_best's, until its stage ends)
        # the run's id, which its checkpoints carry: the checkpoints of other runs are neither resumed nor pruned
        # (None: a run of a version without ids, and its checkpoints)
        self.run_id: str | None = run.read_run_id()
        if rank == 0:
            for leftover in self.dir.glob("*" + TMP_SUFFIX):  # a save cut short by a crash or a kill
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
                log.info("removed %s, left by an interrupted save", leftover)

    def register(self, name: str, component, per_rank: bool = False) -> None:
        self.components[name] = (component, per_rank)

    def start_point(self, resume: str | None, init_from: str | None) -> tuple[Path, dict] | None:
        """The checkpoint a run resumes (`resume`, see `resolve`) or starts from (`init_from`) with its meta.json,
        or None. Rank 0 verifies it (its digests are read once, not once a rank) and every rank gets the same
        answer: the same checkpoint, or the same error."""
        outcome = None
        if self.rank == 0:
            try:
                path = self.resolve(resume) if resume else Path(init_from) if init_from else None
                outcome = (path, check_checkpoint(path, self.digest_cache)) if path else None
            except CheckpointError as err:
                outcome = err
        outcome = all_gather_objects(outcome)[0]
        if isinstance(outcome, CheckpointError):
            raise outcome
        return outcome

    @staticmethod
    def is_checkpoint(path: Path) -> bool:
        return (path / META).is_file()

    def new_run_id(self) -> str:
        """A new run's id, the same on every rank (rank 0's). Collective."""
        return all_gather_objects(uuid.uuid4().hex if self.rank == 0 else None)[0]

    def belongs(self, path: Path) -> bool:
        """Whether checkpoint `path` is of this run (an unreadable one counts as this run's: verifying it says
        what is wrong with it)."""
        try:
            return json.loads((path / META).read_text()).get("run_id") == self.run_id
        except (OSError, ValueError, AttributeError):
            return True

    def discard(self, paths: list[Path]) -> None:
        """The checkpoints `paths` (an earlier run's, which --overwrite replaces) and the `latest` hint go."""
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
        (self.dir / LATEST).unlink(missing_ok=True)

    def all_checkpoints(self) -> list[Path]:
        """The checkpoints in the directory, of any run, newest first."""
        return checkpoints_in(self.dir)

    def own_checkpoints(self) -> list[Path]:
        """This run's checkpoints in the directory, newest first."""
        return [path for path in self.all_checkpoints() if self.belongs(path)]

    def due(self, step: int) -> bool:
        return self.cfg.save_every is not None and step % self.cfg.save_every == 0

    def resolve(self, resume: str) -> Path | None:
        """`auto`: the newest checkpoint in the directory that verifies (None when there is none), saying which
        were passed over; else a checkpoint path."""
        if resume != "auto":
            return Path(resume)
        found = self.all_checkpoints()
        candidates = [path for path in found if self.belongs(path)]
        others = [path for path in found if path not in candidates]
        if others:
            log.info("%s: %s of another run, left alone", self.dir, listed([path.name for path in others]))
        hint = self._latest_hint()
        if candidates and hint != candidates[0].name:
            log.warning("%s names %s, but %s is the newest checkpoint there: it is tried first", self.dir /
                        LATEST, hint or "nothing", candidates[0].name)
        for i, path in enumerate(candidates):
            try:
                check_checkpoint(path, self.digest_cache)
            except CheckpointError as err:
                if i + 1 < len(candidates):
                    log.warning("%s: falling back to %s", err, candidates[i + 1].name)
                    continue
                raise
            return path
        return None

    def _latest_hint(self) -> str | None:
        try:
            return (self.dir / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None

    def _states(self, per_rank: bool) -> dict:
        return {name: component.state_dict() for name, (component, own) in self.components.items()
                if own == per_rank and hasattr(component, "state_dict")}

    def save(self, step: int, meta: dict) -> Path:
        """Write checkpoint `global_step<step>` (collective: every rank writes its part); `meta` joins meta.json.
        A full disk is reported as such (libraries say it as an iostream error), and what the save wrote goes; the
        previous checkpoint stays."""
        tmp = self.dir / (checkpoint_tag(step) + TMP_SUFFIX)
        try:
            return self._save(step, meta, tmp)
        except (OSError, RuntimeError) as err:
            if not disk_full(err, self.dir):
                raise
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            before = (f"the previous checkpoint, {self.previous.name}, is intact" if self.previous else
                      "no checkpoint of this run had been written yet")
            raise CheckpointError(f"the disk is full: writing checkpoint {tmp.name.removesuffix(TMP_SUFFIX)} into "
                                  f"{self.dir} failed ({shutil.disk_usage(self.dir).free} bytes free); {before}"
                                  ) from None

    def _save(self, step: int, meta: dict, tmp: Path) -> Path:
        tag = checkpoint_tag(step)
        final = self.dir / tag
        started = time.time()
        with_files = [name for name, (component, _) in self.components.items() if hasattr(component, "save_files")]
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            for name in with_files:
                (tmp / name).mkdir(parents=True)
        barrier()
        # the position of this checkpoint in its chain of linked ones (0: a full copy, see the module docstring)
        chain_length = self.cfg.keep_last - 1 if self.cfg.keep_last > 1 else math.inf  # one kept: always linked
        chain = self.chain + 1 if self.previous and self.chain + 1 < chain_length else 0
        linked_to = self.previous if chain else None
        for name in with_files:
            self.components[name][0].save_files(tmp / name, linked_to / name if linked_to else None)
        torch.save(self._states(per_rank=True), tmp / rank_state(self.rank))
        if self.rank == 0:
            torch.save(self._states(per_rank=False), tmp / SHARED_STATE)
        barrier()
        if self.rank == 0:
            files = files_under(tmp)
            meta = meta | {"run_id": self.run_id, "world_size": self.world_size, "components": list(self.components),
                           "chain": chain,
                           "files": files, "digests": manifest(tmp, files, self.digest_cache)}
            (tmp / META).write_text(json.dumps(meta | {"meta_digest": meta_digest(meta)}, indent=2))
            fsync_tree(tmp)
            if final.exists():  # saved again at the same step (e.g. the end of a resumed run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(self.dir)
            write_atomically(self.dir / LATEST, tag)
            self.prune(keep=final)
            log.info("checkpoint %s written in %.1f s", final, time.time() - started)
        barrier()
        self.previous, self.chain = final, chain
        return final

    def load(self, path: Path, meta: dict) -> None:
        """Every component's state from `path` (checked by `check_checkpoint`). Written by another number of
        ranks, per-rank states are left out and components with files are told to re-slice."""
        resharded = meta["world_size"] != self.world_size
        shared = load_torch_file(path / SHARED_STATE)
        own = {} if resharded else load_torch_file(path / rank_state(self.rank))
        for name, (component, per_rank) in self.components.items():
            state = (own if per_rank else shared).get(name)
            if state is not None:
                component.load_state_dict(state)
            if hasattr(component, "load_files"):
                component.load_files(path / name, resharded)
        self.previous, self.chain = path, meta.get("chain", 0)

    def load_weights(self, path: Path) -> None:
        """`--init-from`: the weights of the components that have them, nothing else."""
        for name, (component, _) in self.components.items():
            if hasattr(component, "load_weights"):
                component.load_weights(path / name)

    def prune(self, keep: Path) -> None:
        for old in self.own_checkpoints()[self.cfg.keep_last:]:
            if old != keep and old.resolve() not in self.pinned:
                shutil.rmtree(old)

    def discard_after(self, path: Path) -> None:
        """The run went back to checkpoint `path`: the checkpoints of later steps (of the steps undone) go, and
        `path` is the latest again. Collective."""
        if self.rank == 0:
            for later in self.own_checkpoints():
                if step_of(later.name) > step_of(path.name):
                    shutil.rmtree(later)
            write_atomically(self.dir / LATEST, path.name)
        barrier()
