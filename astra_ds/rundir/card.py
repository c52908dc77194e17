"""The model card of a finished run (model.json): what predicting needs besides the weights and rows.

Score of label l for query q:  logit = exp(log_scale) * <q, v_l> + bias,  probability = sigmoid(logit), where q is
the unit-norm query embedding and v_l = s_l w_l (w_l / |w_l| with normalize_rows) + label_text_weight * e_l; s_l is 1
but for labels added after training, whose scale row_scales records ([first id, end id, s] a `labels add`). With
neighbour_weight > 0, <q, v_l> + neighbour_weight * (kNN votes of the training queries for l) ranks the top
neighbour_candidates labels of <q, v_l> and takes its place in the logit (scoring/neighbour_votes.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from astra_ds.files import write_atomically

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
    def of_run(cls, cfg, num_labels: int, dim: int, step: int, calibration) -> "ModelCard":
        """The card of a model trained with the RunConfig `cfg`; `calibration`: (log scale, bias)."""
        return cls(step, num_labels, dim, cfg.encoder.model, cfg.encoder.pooling, cfg.data.max_len,
                   cfg.table.normalize_rows, cfg.eval.label_text_weight, float(calibration[0]), float(calibration[1]),
                   str(Path(cfg.data.path).resolve()), neighbour_weight=cfg.eval.neighbour_weight)

    @classmethod
    def load(cls, path: Path) -> "ModelCard":
        values = json.loads(path.read_text())
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
