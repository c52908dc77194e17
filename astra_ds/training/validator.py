"""Evaluations of the model as it is during training: on the validation split (along training, for model
selection) and on the test split at the end, whose metrics.json and predictions.npz go into the run directory.
Exact top-k over every rank's rows; the embeddings come from Encodings, computed again only when the encoder
has changed.
"""

from __future__ import annotations

from pathlib import Path

from astra_ds.data.prepare import TEST, EvalSplit
from astra_ds.eval.evaluate import MODEL, evaluate, exact_topk_all_ranks, search_k
from astra_ds.eval.metrics import format_table
from astra_ds.rundir.run_dir import RunDir
from astra_ds.training.build import Training
from astra_ds.training.encodings import Encodings


class Validator:
    def __init__(self, parts: Training, encodings: Encodings, run: RunDir):
        self.parts, self.encodings, self.run = parts, encodings, run

    def evaluate(self, split: EvalSplit, step: int) -> dict:
        """Metrics on `split` of the model after `step` steps (model name -> "P@1" ... -> value), printed by
        rank 0; written into the run directory for the test split."""
        parts, cfg = self.parts, self.parts.cfg
        label_embeddings = self.encodings.label_embeddings() if cfg.eval.label_text_weight > 0 else None
        votes = self.encodings.neighbour_votes() if cfg.eval.neighbour_weight > 0 else None
        queries, calibration = self.encodings.queries(split)
        topk = exact_topk_all_ranks(queries, parts.table, cfg.eval, cfg.table.normalize_rows,
                                    search_k(cfg.eval, split.filter), label_embeddings, votes, parts.progress)
        about = {"step": step, "dataset": str(Path(cfg.data.path).resolve()), "split": split.name, "topk": "exact"}
        results = evaluate({MODEL: topk}, calibration, split.labels, parts.data.train_counts, cfg.eval,
                           parts.table.num_labels, self.run.path, about, split.filter,
                           write=parts.dist.is_main and split.name == TEST)
        if parts.dist.is_main:
            header = "" if split.name == TEST else f"{split.name} split, step {step}:\n"
            print(header + format_table(results, cfg.eval.ks), flush=True)
        return results

    def p_at_1(self, split: EvalSplit, step: int) -> float:
        return self.evaluate(split, step)[MODEL]["P@1"]
