"""The model card of a finished run (model.json): what predicting needs besides the weights and rows.

Score of label l for query q:  logit = exp(log_scale) * <q, v_l> + bias,  probability = sigmoid(logit), where q is
the unit-norm query embedding and v_l = s_l w_l (w_l / |w_l| with normalize_rows) + label_text_weight * e_l; s_l is 1
but for labels added after training, whose scale row_scales records ([first id, end id, s] a `labels add`). With
neighbour_weight > 0, <q, v_l> + neighbour_weight * (kNN votes of the training queries for l) ranks the top
neighbour_candidates labels of <q, v_l> and takes its place in the logit (eval/neighbour_votes.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from astra_ds import layout
from astra_ds.digests import DigestCache, damaged_files, listed, manifest
from astra_ds.errors import UserError
from astra_ds.files import files_under, fsync_dir, write_atomically
from astra_ds.serve.verified import already_verified, remember_verified

SCORE_FORMULA = ("logit = exp(log_scale) * <q, v> + bias, probability = sigmoid(logit); q the unit-norm query "
                 "embedding, v = s * (w / |w| if normalize_rows else w) + label_text_weight * e, s from row_scales "
                 "(1 elsewhere); with neighbour_weight > 0, <q, v> + neighbour_weight * votes in place of <q, v> "
                 "for the top labels")


@dataclass
class ModelCard:
    step: int  # training steps behind the weights
    num_labels: int
    dim: int
    encoder: str  # the encoder.model it was trained from
    pooling: str
    max_len: int  # query tokens, after truncation
    normalize_rows: bool
    label_text_weight: float
    log_scale: float
    bias: float
    dataset: str  # the training data's path, absolute
    row_scales: list = dataclasses.field(default_factory=list)  # [first id, end id, scale] of each `labels add`
    neighbour_weight: float = 0.0  # the kNN votes' weight (0: none)
    score: str = SCORE_FORMULA

    def save(self, path: Path) -> None:
        write_atomically(path, json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "ModelCard":
        values = json.loads(path.read_text())
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def read_card(run_dir: Path) -> ModelCard:
    """The card of the finished run at `run_dir`, once its files are verified (see verify_run)."""
    verify_run(run_dir)
    return ModelCard.load(run_dir / layout.MODEL_CARD)


def write_model_files(run_dir: Path, cfg, num_labels: int, dim: int, step: int, calibration,
                      label_texts: list[str] | None) -> None:
    """model.json and label_names.txt (the dataset's label texts, one a line) of a finished run."""
    if label_texts is not None:
        write_atomically(run_dir / layout.LABEL_NAMES, "\n".join(text.replace("\n", " ") for text in label_texts))
    ModelCard(step, num_labels, dim, cfg.encoder.model, cfg.encoder.pooling, cfg.data.max_len,
              cfg.table.normalize_rows, cfg.eval.label_text_weight, float(calibration[0]), float(calibration[1]),
              str(Path(cfg.data.path).resolve()),
              neighbour_weight=cfg.eval.neighbour_weight).save(run_dir / layout.MODEL_CARD)


def label_names(run_dir: Path, num_labels: int) -> list[str] | None:
    """The names of the run's first `num_labels` labels (label_names.txt), or None when it has none."""
    path = run_dir / layout.LABEL_NAMES
    return path.read_text(encoding="utf-8").split("\n")[:num_labels] if path.is_file() else None


def retired_ids(run_dir: Path) -> np.ndarray:
    """The sorted ids of the run's retired labels (none: an empty array)."""
    path = run_dir / layout.RETIRED_LABELS
    return np.array(sorted(json.loads(path.read_text())["retired"]) if path.is_file() else [], dtype=np.int64)


def _model_files(run_dir: Path) -> list[str]:
    names = [layout.CONFIG, layout.ENCODER_WEIGHTS, layout.MODEL_CARD, layout.LABEL_NAMES, layout.RETIRED_LABELS]
    files = [name for name in names if (run_dir / name).is_file()]
    for directory in (layout.TABLE, layout.LABEL_EMBEDDINGS, layout.NEIGHBOURS):
        files += [f"{directory}/{name}" for name in files_under(run_dir / directory)]
    return files


def withdraw_run(run_dir: Path) -> None:
    """Before a run (re)writes its directory: no longer a finished run until write_run_manifest publishes it
    again, so that a kill halfway leaves a directory that is refused, not a mix of two models."""
    (run_dir / layout.MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(run_dir / layout.ANN_DIR, ignore_errors=True)
    if run_dir.is_dir():
        fsync_dir(run_dir)


def write_run_manifest(run_dir: Path, known: DigestCache | None = None) -> None:
    """manifest.json, written last: the digests of the files a finished run's model is made of (not the
    rebuildable index), those of `known` files not read again. Its presence is what makes the directory a
    finished run; the files it lists have just been digested, so the run counts as verified (serve/verified.py)."""
    digests = manifest(run_dir, _model_files(run_dir), known)
    write_atomically(run_dir / layout.MANIFEST, json.dumps(digests, indent=1))
    remember_verified(run_dir, [layout.MANIFEST, *digests])


def check_published(run_dir: Path) -> Path:
    """Refuses a directory that is not a finished run (nothing read but its listing); returns its manifest."""
    path = run_dir / layout.MANIFEST
    if not run_dir.is_dir():
        raise UserError(f"no run at {run_dir}")
    if not path.is_file() and (run_dir / layout.LABELS_CHANGE).is_file():
        raise UserError(f"{run_dir} is changing its labels, or a change was interrupted: `astra-ds labels finish "
                        f"--run-dir {run_dir}` finishes it")
    if not path.is_file():
        raise UserError(f"{run_dir} is not a finished run: its training has not saved a complete model (no "
                        f"{layout.MANIFEST}); `astra-ds train --resume auto` finishes it")
    return path


def verify_run(run_dir: Path) -> None:
    """Refuses a directory that is not a finished run (no manifest.json: a training that has not finished saving
    its model, or was killed while saving it) or whose model files are missing or changed since training wrote
    them. Checked once per model version (serve/verified.py)."""
    path = check_published(run_dir)
    try:
        digests = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is damaged ({err})") from None
    names = [layout.MANIFEST, *digests]
    if already_verified(run_dir, names):
        return
    damaged = damaged_files(run_dir, digests)
    if damaged:
        raise UserError(f"{run_dir} is damaged: {listed(damaged)} missing or changed since training wrote them")
    remember_verified(run_dir, names)
