"""Full-state checkpoints (DESIGN §5): <dir>/global_step<N>/ holds

    meta.json           step, epoch, world size, index version: small, read before anything is built
    encoder/            the DeepSpeed engine state (each rank's ZeRO shard), with universal-checkpoint info
    table/              classifier rows and their optimizer state (zarr, global label order); chunks no step
                        changed since the previous checkpoint are hard links to its files
    trainer_state.pt    what every rank shares: batch sampler (clusters), ASTRA shortlists, NGAME embeddings
    rank<r>.pt          rank r's RNG states (python, numpy, torch), its index's version and row offset
    rank<r>.faiss       rank r's faiss index (ASTRA, once built), written by faiss.write_index

A checkpoint is written as global_step<N>.tmp, fsynced and renamed; then the file `latest` (naming the tag) is
replaced atomically, and checkpoints beyond keep_last are deleted. A crash at any point leaves the previous
checkpoint and `latest` as they were.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from astra_ds.config import CheckpointConfig

log = logging.getLogger("astra_ds")

LATEST, META, TMP_SUFFIX = "latest", "meta.json", ".tmp"
REQUIRED = (META, "encoder", "table", "trainer_state.pt")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or unreadable."""


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
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def step_of(tag: str) -> int:
    return int(tag.removeprefix("global_step"))


def check_checkpoint(path: Path) -> dict:
    """The checkpoint's meta.json, or a CheckpointError that says what is wrong."""
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    missing = [name for name in REQUIRED if not (path / name).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)})")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable {META}: {err}") from None
    files = ["rank{}.pt"] + (["rank{}.faiss"] if meta.get("index_version", 0) > 0 else [])
    absent = [f.format(r) for r in range(meta["world_size"]) for f in files if not (path / f.format(r)).is_file()]
    if absent:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(absent)})")
    return meta


def convert_encoder_to_universal(path: Path, tag: str, is_main: bool) -> str:
    """Convert the encoder's ZeRO state `path/tag` to DeepSpeed's universal format, which loads on any number of
    ranks (rank 0 converts, once: the result stays in the checkpoint); returns the universal tag."""
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    universal = tag + "_universal"
    if is_main and not (path / universal).is_dir():
        tmp = path / (universal + TMP_SUFFIX)
        shutil.rmtree(tmp, ignore_errors=True)
        ds_to_universal(SimpleNamespace(input_folder=str(path / tag), output_folder=str(tmp), num_extract_workers=1,
                                        num_merge_workers=1, keep_temp_folder=False, strict=True,
                                        inject_missing_state=False))
        os.replace(tmp, path / universal)
    dist.barrier()
    return universal


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, out_dir: str | Path, is_main: bool):
        self.cfg, self.is_main = cfg, is_main
        self.dir = Path(cfg.dir) if cfg.dir else Path(out_dir) / "checkpoints"
        self.previous: Path | None = None  # the last checkpoint saved or loaded: its unchanged table chunks are linked

    def due(self, step: int) -> bool:
        return self.cfg.save_every is not None and step % self.cfg.save_every == 0

    def resolve(self, resume: str) -> Path | None:
        """`auto`: the checkpoint `latest` names (None when this run has none yet); else a checkpoint path."""
        if resume != "auto":
            return Path(resume)
        latest = self.dir / LATEST
        if not latest.is_file():
            return None
        return self.dir / latest.read_text().strip()

    def save(self, step: int, write_state) -> Path:
        """Write checkpoint `global_step<step>`; `write_state(directory, previous)` writes every rank's part."""
        tag = f"global_step{step}"
        final, tmp = self.dir / tag, self.dir / (tag + TMP_SUFFIX)
        started = time.time()
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            tmp.mkdir(parents=True)
        dist.barrier()
        write_state(tmp, self.previous)
        dist.barrier()
        if self.is_main:
            fsync_tree(tmp)
            if final.exists():  # saved again at the same step (e.g. the end of a resumed run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            write_atomically(self.dir / LATEST, tag)
            self.prune(keep=final)
            log.info("checkpoint %s written in %.1f s", final, time.time() - started)
        dist.barrier()
        self.previous = final
        return final

    def prune(self, keep: Path) -> None:
        tags = sorted((p for p in self.dir.glob("global_step*") if p.is_dir() and not p.name.endswith(TMP_SUFFIX)),
                      key=lambda p: step_of(p.name))
        for old in tags[:-self.cfg.keep_last]:
            if old != keep:
                shutil.rmtree(old)
