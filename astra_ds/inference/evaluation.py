"""A finished run evaluated on a split of its dataset (or another dataset of the same labels): the metrics of its
top-k, searched the way it is served, exactly, or both ways with the recall of the ANN top-k against exact.

    evaluation = astra_ds.load("runs/synthetic").evaluate(split="test", search="both")
    evaluation.results["astra_ds"]["P@1"]
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from enum import Enum, unique
from pathlib import Path

from astra_ds.errors import ConfigError, UserError
from astra_ds.eval.evaluate import MODEL, MODEL_ANN, ann_recall, evaluate, search_k
from astra_ds.eval.metrics import format_table


@unique
class Search(str, Enum):
    SERVED = "served"  # the serving index when the run has one, else exact search
    EXACT = "exact"
    BOTH = "both"  # the serving index and exact search: the metrics of each, and the ANN top-k's recall


@dataclass
class Evaluation:
    results: dict[str, dict[str, float]]  # model name -> "P@1" ... -> value (metrics.json holds them too)
    about: dict  # the step, the dataset, the split, the searches and their seconds
    out_dir: Path  # where metrics.json and predictions.npz were written
    ks: tuple[int, ...]

    def format(self) -> str:
        """The metrics table and a line on the searches, as `astra-ds eval` prints them."""
        seconds = self.about["topk_seconds"]
        recall = next((f" | ANN recall@{key.split('@')[1]} against exact: {value:.4f}"
                       for key, value in self.about.items() if key.startswith("ann_recall@")), "")
        filtered = self.about.get("filtered_pairs")
        return (format_table(self.results, self.ks) + f"\ntop-k of {self.about['num_queries']} queries: "
                + ", ".join(f"{kind} {s:.2f} s" for kind, s in seconds.items()) + recall
                + (f"\nfilter_labels_test.txt applied: {filtered} reciprocal pairs left out" if filtered is not None
                   else "") + f"\nwritten to {self.out_dir}")


def evaluate_model(model, split_name: str, search: Search, out_dir: Path | None) -> Evaluation:
    """`model` (an XCModel) on the split `split_name` of its data; metrics.json and predictions.npz go into
    `out_dir` (created if needed; None: the run's next evals/<n>, claimed once the evaluation can be made)."""
    data = model.load_data()
    split = data.split(split_name)
    if not len(split.tokens):
        raise UserError(f"the {split.name} split of {model.cfg.data.path} holds no queries: nothing to evaluate")
    if search is Search.BOTH and model.index is None:
        raise UserError(f"{model.run} has no serving index: build it with `astra-ds index --run-dir {model.run}`")
    k = search_k(model.cfg.eval, split.filter)
    if k > model.num_labels:
        raise ConfigError(f"eval.ks asks for the top {k} (filtered pairs included) of {model.num_labels} labels")
    queries, calibration = model.encode_tokens(split.tokens)
    if search is Search.BOTH:
        searches = {MODEL: "exact", MODEL_ANN: "ann"}
    else:
        searches = {MODEL: "exact" if search is Search.EXACT or model.index is None else "ann"}
    topk, seconds = {}, {}
    for name, kind in searches.items():
        started = time.perf_counter()
        topk[name] = model.topk(queries, k, exact=kind == "exact")
        seconds[kind] = time.perf_counter() - started
    about = {"step": model.card.step, "dataset": str(Path(model.cfg.data.path).resolve()), "split": split.name,
             "topk": " and ".join(seconds), "topk_seconds": {kind: round(s, 3) for kind, s in seconds.items()}}
    if search is Search.BOTH:
        about[f"ann_recall@{k}"] = ann_recall(topk[MODEL_ANN][1], topk[MODEL][1])
    claimed = out_dir is None
    out_dir = out_dir or model.run.claim_eval_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        results = evaluate(topk, calibration, split.labels, data.train_counts, model.cfg.eval,
                           model.num_labels, out_dir, about, split.filter)
    except BaseException:
        if claimed:  # no empty or partial evals/<n> left behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    about |= {"num_queries": len(queries), "filtered_pairs": split.filter.nnz if split.filter is not None else None}
    return Evaluation(results, about, out_dir, tuple(model.cfg.eval.ks))
