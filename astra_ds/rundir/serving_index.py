"""The serving index of a finished run: faiss over the vectors that exact top-k scores queries against
(ScoringRows: classifier rows, plus the weighted label-text embeddings with dual scoring), so that the approximate
top-k ranks by the same score. Built from the saved arrays a block at a time (any number of ranks wrote them),
kind chosen by L as for training (HNSW, IVF-Flat, IVF-PQ; faiss-gpu when present), saved in <run>/ann/. A run
with kNN votes gets a second index there, over its training queries' embeddings (neighbours/), which finds the
voters of a query served through the index: an exact search over them costs more than the labels' search.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from astra_ds.config import IndexConfig
from astra_ds.digests import file_digest
from astra_ds.errors import UserError
from astra_ds.files import TMP_SUFFIX, disk_full, fsync_tree, output_file, write_atomically
from astra_ds.index.label_index import LabelIndex
from astra_ds.rng import Stream, numpy_rng
from astra_ds.rundir.card import ModelCard
from astra_ds.rundir.run_dir import RunDir
from astra_ds.scoring.rows import ScoringRows
from astra_ds.table.store import StoredRows

log = logging.getLogger("astra_ds")


def stored_scoring_rows(run: RunDir, card: ModelCard) -> ScoringRows:
    """The scoring vectors of a run, read from its table (and label embeddings) on disk."""
    embeddings = StoredRows(run.label_embeddings) if card.label_text_weight else None
    return ScoringRows(StoredRows(run.table), card.normalize_rows, embeddings, card.label_text_weight,
                       card.row_scales)


def build_serving_index(run: RunDir, cfg: IndexConfig, seed: int = 0, progress: bool = False,
                        card: ModelCard | None = None) -> dict:
    """Builds <run>/ann/ (replacing an older one only once the new one is complete); returns its description.
    `card`: the run's, when it was just read (and verified)."""
    card = card or run.read_card()
    index = LabelIndex(cfg, normalize_rows=False)  # ScoringRows already are what is scored
    report = index.build(stored_scoring_rows(run, card), numpy_rng(seed, Stream.SERVING_INDEX), progress)
    info = {"kind": report.kind, "num_labels": report.rows, "dim": card.dim, "step": card.step,
            "build_seconds": round(report.seconds, 3), "normalize_rows": card.normalize_rows,
            "label_text_weight": card.label_text_weight, "nprobe": cfg.nprobe, "ef_search": cfg.ef_search,
            "model": run.version()}  # the model whose rows it holds
    final = run.serving_index_dir
    tmp = final.with_name(final.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_serving_index(run, cfg, seed, progress, card, index, info, tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # the old index stays, unless the swap had begun (then exact search)
        if isinstance(err, (OSError, RuntimeError)) and disk_full(err, run.path):
            raise UserError(f"the disk is full: writing the serving index into {final} failed "
                            f"({shutil.disk_usage(run.path).free} bytes free); `astra-ds index --run-dir {run}` "
                            "builds it once there is room") from None
        raise
    log.info("serving index (%s) over %d labels built in %.1f s: %s", report.kind, report.rows, report.seconds, final)
    return info


def _write_serving_index(run: RunDir, cfg: IndexConfig, seed: int, progress: bool, card: ModelCard,
                         index: LabelIndex, info: dict, tmp: Path) -> None:
    """The serving index `index` (and the neighbour index over the training queries) written into `tmp`."""
    tmp.mkdir()
    index.save(tmp / Path(RunDir.serving_index).name)
    info["digest"] = file_digest(tmp / Path(RunDir.serving_index).name)  # checked on load: faiss reads damage silently
    if card.neighbour_weight:
        neighbours = LabelIndex(cfg, normalize_rows=False)
        built = neighbours.build(StoredRows(run.neighbours), numpy_rng(seed, Stream.SERVING_INDEX),
                                 progress)
        neighbours.save(tmp / Path(RunDir.neighbour_index).name)
        info["neighbours"] = {"kind": built.kind, "rows": built.rows, "build_seconds": round(built.seconds, 3),
                              "digest": file_digest(tmp / Path(RunDir.neighbour_index).name)}
        log.info("neighbour index (%s) over %d training queries built in %.1f s", built.kind, built.rows, built.seconds)
    (tmp / Path(RunDir.serving_index_info).name).write_text(json.dumps(info, indent=2))
    fsync_tree(tmp)


def load_serving_index(run: RunDir, cfg: IndexConfig, card: ModelCard,
                       label_text_weight: float) -> LabelIndex | None:
    """The run's serving index, or None when it has none or it scores with another label-text weight; refused
    when it is not of this model's rows."""
    if not (run.serving_index).is_file():
        return None
    rebuild = f"rebuild it with `astra-ds index --run-dir {run}`"
    try:
        info = json.loads((run.serving_index_info).read_text())
        digest = info["digest"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{run.serving_index_info} is missing or unreadable: {rebuild}") from None
    if file_digest(run.serving_index) != digest:
        raise UserError(f"{run.serving_index} is damaged (changed since it was built): {rebuild}")
    if info["label_text_weight"] != label_text_weight:
        log.warning("the serving index scores with eval.label_text_weight=%g, not %g: exact search instead",
                    info["label_text_weight"], label_text_weight)
        return None
    if info.get("model") != run.version():
        raise UserError(f"{run.serving_index_dir} was built for other rows ({info['num_labels']} x {info['dim']} "
                        f"at step {info['step']}): {rebuild}")
    index = LabelIndex(cfg, normalize_rows=False)
    started = time.perf_counter()
    index.load(run.serving_index, stored_scoring_rows(run, card))
    log.debug("serving index loaded in %.2f s", time.perf_counter() - started)
    return index


def load_neighbour_index(run: RunDir, cfg: IndexConfig) -> LabelIndex | None:
    """The index over the run's training queries (kNN votes), or None when its serving index has none; refused when
    damaged. Called after load_serving_index, which checked that the serving index is of this model."""
    try:
        info = json.loads((run.serving_index_info).read_text()).get("neighbours")
    except OSError:
        return None
    if info is None:
        return None
    path = run.neighbour_index
    if not path.is_file() or file_digest(path) != info["digest"]:
        raise UserError(f"{path} is missing or damaged (changed since it was built): rebuild it with "
                        f"`astra-ds index --run-dir {run}`")
    index = LabelIndex(cfg, normalize_rows=False)
    index.load(run.neighbour_index, StoredRows(run.neighbours))
    return index


def stamp_serving_index(run: RunDir) -> None:
    """The serving index marked as the current model version's (after a change that left its vectors valid)."""
    if run.serving_index_info.is_file():
        info = json.loads(run.serving_index_info.read_text())
        info["model"] = run.version()
        write_atomically(run.serving_index_info, json.dumps(info, indent=2))


class RowsInMemory:
    """Rows [start, start + len(rows)) held in memory: what ScoringRows reads."""

    def __init__(self, rows: torch.Tensor, start: int):
        self.rows, self.start, self.end, self.dim, self.device = rows, start, start + len(rows), rows.shape[1], rows.device

    def block_rows(self, start: int, end: int) -> torch.Tensor:
        return self.rows[start - self.start:end - self.start]


def add_to_serving_index(run: RunDir, cfg: IndexConfig, rows: RowsInMemory, label_embeddings: RowsInMemory,
                         card: ModelCard) -> None:
    """New labels' scoring vectors (rows appended after the index's) added to the serving index in place, unless
    a crash came after that."""
    info = json.loads(run.serving_index_info.read_text())
    index = LabelIndex(cfg, normalize_rows=False)
    index.load(run.serving_index, RowsInMemory(torch.empty(rows.start, 0), 0))
    if index.index.ntotal == rows.start:
        vectors = ScoringRows(rows, card.normalize_rows, label_embeddings, info["label_text_weight"], card.row_scales)
        index.index.add(np.ascontiguousarray(vectors.block_rows(rows.start, rows.end).numpy()))
        with output_file(run.serving_index, TMP_SUFFIX) as tmp:
            index.save(tmp)
    info |= {"num_labels": rows.end, "digest": file_digest(run.serving_index)}
    write_atomically(run.serving_index_info, json.dumps(info, indent=2))
