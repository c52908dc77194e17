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

from astra_ds import layout
from astra_ds.config import IndexConfig
from astra_ds.digests import file_digest
from astra_ds.errors import UserError
from astra_ds.files import fsync_tree
from astra_ds.index.label_index import LabelIndex
from astra_ds.rng import Stream, numpy_rng
from astra_ds.scoring import ScoringRows
from astra_ds.serve.card import ModelCard, read_card
from astra_ds.table.store import StoredRows

log = logging.getLogger("astra_ds")


def stored_scoring_rows(run_dir: Path, card: ModelCard) -> ScoringRows:
    """The scoring vectors of a run, read from its table (and label embeddings) on disk."""
    embeddings = StoredRows(run_dir / layout.LABEL_EMBEDDINGS) if card.label_text_weight else None
    return ScoringRows(StoredRows(run_dir / layout.TABLE), card.normalize_rows, embeddings, card.label_text_weight,
                       card.row_scales)


def build_serving_index(run_dir: str | Path, cfg: IndexConfig, seed: int = 0, progress: bool = False,
                        card: ModelCard | None = None) -> dict:
    """Builds <run>/ann/ (replacing an older one only once the new one is complete); returns its description.
    `card`: the run's, when it was just read (and verified)."""
    run_dir = Path(run_dir)
    card = card or read_card(run_dir)
    index = LabelIndex(cfg, normalize_rows=False)  # ScoringRows already are what is scored
    report = index.build(stored_scoring_rows(run_dir, card), numpy_rng(seed, Stream.SERVING_INDEX), progress)
    info = {"kind": report.kind, "num_labels": report.rows, "dim": card.dim, "step": card.step,
            "build_seconds": round(report.seconds, 3), "normalize_rows": card.normalize_rows,
            "label_text_weight": card.label_text_weight, "nprobe": cfg.nprobe, "ef_search": cfg.ef_search,
            "model": file_digest(run_dir / layout.MANIFEST)}  # the model whose rows it holds
    final = run_dir / layout.ANN_DIR
    tmp = final.with_name(final.name + layout.TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    index.save(tmp / Path(layout.ANN_INDEX).name)
    info["digest"] = file_digest(tmp / Path(layout.ANN_INDEX).name)  # checked on load: faiss reads damage silently
    if card.neighbour_weight:
        neighbours = LabelIndex(cfg, normalize_rows=False)
        built = neighbours.build(StoredRows(run_dir / layout.NEIGHBOURS), numpy_rng(seed, Stream.SERVING_INDEX),
                                 progress)
        neighbours.save(tmp / Path(layout.ANN_NEIGHBOURS).name)
        info["neighbours"] = {"kind": built.kind, "rows": built.rows, "build_seconds": round(built.seconds, 3),
                              "digest": file_digest(tmp / Path(layout.ANN_NEIGHBOURS).name)}
        log.info("neighbour index (%s) over %d training queries built in %.1f s", built.kind, built.rows, built.seconds)
    (tmp / Path(layout.ANN_INFO).name).write_text(json.dumps(info, indent=2))
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.info("serving index (%s) over %d labels built in %.1f s: %s", report.kind, report.rows, report.seconds, final)
    return info


def load_serving_index(run_dir: Path, cfg: IndexConfig, card: ModelCard,
                       label_text_weight: float) -> LabelIndex | None:
    """The run's serving index, or None when it has none or it scores with another label-text weight; refused
    when it is not of this model's rows."""
    if not (run_dir / layout.ANN_INDEX).is_file():
        return None
    rebuild = f"rebuild it with `astra-ds index --run-dir {run_dir}`"
    try:
        info = json.loads((run_dir / layout.ANN_INFO).read_text())
        digest = info["digest"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{run_dir / layout.ANN_INFO} is missing or unreadable: {rebuild}") from None
    if file_digest(run_dir / layout.ANN_INDEX) != digest:
        raise UserError(f"{run_dir / layout.ANN_INDEX} is damaged (changed since it was built): {rebuild}")
    if info["label_text_weight"] != label_text_weight:
        log.warning("the serving index scores with eval.label_text_weight=%g, not %g: exact search instead",
                    info["label_text_weight"], label_text_weight)
        return None
    if info.get("model") != file_digest(run_dir / layout.MANIFEST):
        raise UserError(f"{run_dir / layout.ANN_DIR} was built for other rows ({info['num_labels']} x {info['dim']} "
                        f"at step {info['step']}): {rebuild}")
    index = LabelIndex(cfg, normalize_rows=False)
    started = time.perf_counter()
    index.load(run_dir / layout.ANN_INDEX, stored_scoring_rows(run_dir, card))
    log.debug("serving index loaded in %.2f s", time.perf_counter() - started)
    return index


def load_neighbour_index(run_dir: Path, cfg: IndexConfig) -> LabelIndex | None:
    """The index over the run's training queries (kNN votes), or None when its serving index has none; refused when
    damaged. Called after load_serving_index, which checked that the serving index is of this model."""
    try:
        info = json.loads((run_dir / layout.ANN_INFO).read_text()).get("neighbours")
    except OSError:
        return None
    if info is None:
        return None
    path = run_dir / layout.ANN_NEIGHBOURS
    if not path.is_file() or file_digest(path) != info["digest"]:
        raise UserError(f"{path} is missing or damaged (changed since it was built): rebuild it with "
                        f"`astra-ds index --run-dir {run_dir}`")
    index = LabelIndex(cfg, normalize_rows=False)
    index.load(run_dir / layout.ANN_NEIGHBOURS, StoredRows(run_dir / layout.NEIGHBOURS))
    return index
