"""The model card of a finished run (model.json): what predicting needs besides the weights and rows.

Score of label l for query q:  logit = exp(log_scale) * <q, v_l> + bias,  probability = sigmoid(logit), where q is
the unit-norm query embedding and v_l = w_l (w_l / |w_l| with normalize_rows) + label_text_weight * e_l.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from astra_ds import layout
from astra_ds.digests import damaged_files, listed, manifest
from astra_ds.errors import UserError
from astra_ds.files import files_under, load_torch_file, write_atomically

SCORE_FORMULA = ("logit = exp(log_scale) * <q, v> + bias, probability = sigmoid(logit); q the unit-norm query "
                 "embedding, v = (w / |w| if normalize_rows else w) + label_text_weight * e")


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
    score: str = SCORE_FORMULA

    def save(self, path: Path) -> None:
        write_atomically(path, json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "ModelCard":
        values = json.loads(path.read_text())
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def read_card(run_dir: Path) -> ModelCard:
    """The card of the finished run at `run_dir`; for a run from before model.json existed, derived from its
    config, encoder weights, table and latest checkpoint."""
    for name in (layout.CONFIG, layout.ENCODER_WEIGHTS, layout.TABLE):
        if not (run_dir / name).exists():
            raise UserError(f"{run_dir} is not a finished run: {name} is missing")
    if (run_dir / layout.MODEL_CARD).is_file():
        return ModelCard.load(run_dir / layout.MODEL_CARD)
    from astra_ds.config import load_config
    from astra_ds.table.store import open_table

    cfg = load_config(run_dir / layout.CONFIG)
    calibration = load_torch_file(run_dir / layout.ENCODER_WEIGHTS)["calibration"]
    attrs = open_table(run_dir / layout.TABLE).attrs
    latest = run_dir / layout.CHECKPOINTS / layout.LATEST
    step = layout.step_of(latest.read_text().strip()) if latest.is_file() else 0
    return ModelCard(step, int(attrs["num_labels"]), int(attrs["dim"]), cfg.encoder.model, cfg.encoder.pooling,
                     cfg.data.max_len, cfg.table.normalize_rows, cfg.eval.label_text_weight, float(calibration[0]),
                     float(calibration[1]), cfg.data.path)


def write_model_files(run_dir: Path, cfg, num_labels: int, dim: int, step: int, calibration,
                      label_texts: list[str] | None) -> None:
    """model.json and label_names.txt (the dataset's label texts, one a line) of a finished run."""
    if label_texts is not None:
        write_atomically(run_dir / layout.LABEL_NAMES, "\n".join(text.replace("\n", " ") for text in label_texts))
    ModelCard(step, num_labels, dim, cfg.encoder.model, cfg.encoder.pooling, cfg.data.max_len,
              cfg.table.normalize_rows, cfg.eval.label_text_weight, float(calibration[0]), float(calibration[1]),
              str(Path(cfg.data.path).resolve())).save(run_dir / layout.MODEL_CARD)


def _model_files(run_dir: Path) -> list[str]:
    names = [layout.ENCODER_WEIGHTS, layout.MODEL_CARD, layout.LABEL_NAMES]
    files = [name for name in names if (run_dir / name).is_file()]
    for directory in (layout.TABLE, layout.LABEL_EMBEDDINGS):
        files += [f"{directory}/{name}" for name in files_under(run_dir / directory)]
    return files


def write_run_manifest(run_dir: Path) -> None:
    """manifest.json: the digests of the files a finished run's model is made of (not the rebuildable index)."""
    write_atomically(run_dir / layout.MANIFEST, json.dumps(manifest(run_dir, _model_files(run_dir)), indent=1))


def verify_run(run_dir: Path) -> None:
    """Refuses a finished run whose model files are missing or changed since training wrote them (runs from
    before manifest.json existed are not checked)."""
    path = run_dir / layout.MANIFEST
    if path.is_file():
        damaged = damaged_files(run_dir, json.loads(path.read_text()))
        if damaged:
            raise UserError(f"{run_dir} is damaged: {listed(damaged)} missing or changed since training wrote them")
