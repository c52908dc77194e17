"""A training run that starts from a finished run (`astra-ds train --init-from RUN_DIR`), on a label set that
holds the run's labels and maybe new ones: the label set grew while the model served (docs/guides/labels.md).

The finished run gives the encoder's weights and, for each of its labels, the row and the row's optimizer state.
A label of the run is found in the new label set by its name (its text: label_names.txt, the dataset's label
texts); labels that share a name are matched in the order they appear on each side. Without names on either side,
label i is label i and the new labels come after the run's. The rows of the new labels start as `table.init` says
(label_text: their texts through the run's encoder, then through the map from text embeddings to trained rows that
`labels add` uses); the stages then train all rows.

Refused in one line: a label of the run missing from the new set (the run's retired labels may be missing), and a
name that the new set holds more than once and the run a different number of times (which of them is the run's?).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from astra_ds.collectives import sum_tensor_across_ranks
from astra_ds.errors import UserError
from astra_ds.labels.text_to_row import fit_ranges, fit_text_to_row, read_stored_rows
from astra_ds.rundir.run_dir import RunDir, one_line

log = logging.getLogger("astra_ds")


def match_labels(run_names: list[str] | None, run_labels: int, names: list[str] | None, num_labels: int,
                 retired: np.ndarray) -> np.ndarray:
    """For each of the `num_labels` labels of the new set, its id in the run, or -1 for a label the run does not
    have. `run_names`/`names`: the labels' names, or None (then matched by id)."""
    if run_names is None or names is None:
        if num_labels < run_labels:
            raise UserError(f"the run has {run_labels} labels and this dataset {num_labels}, and without label names "
                            "on both sides labels are matched by id: the dataset must hold the run's labels first")
        return np.concatenate([np.arange(run_labels), np.full(num_labels - run_labels, -1)])
    run_ids_of: dict[str, list[int]] = defaultdict(list)
    for run_id, name in enumerate(run_names):
        run_ids_of[name].append(run_id)
    new_ids_of: dict[str, list[int]] = defaultdict(list)
    for label, name in enumerate(names):
        new_ids_of[name].append(label)
    run_ids = np.full(num_labels, -1)
    for name, labels in new_ids_of.items():
        known = run_ids_of.get(name, [])
        if len(labels) > 1 and known and len(known) != len(labels):
            raise UserError(f"label name {name!r} names {len(labels)} labels of this dataset and {len(known)} of the "
                            "run: which of them are the run's is ambiguous (give the labels distinct names)")
        run_ids[labels[:len(known)]] = known[:len(labels)]
    missing = np.setdiff1d(np.arange(run_labels), np.concatenate([run_ids[run_ids >= 0], retired]))
    if len(missing):
        shown = ", ".join(repr(run_names[i]) for i in missing[:3])
        raise UserError(f"{len(missing)} labels of the run are not in this dataset's labels (e.g. {shown}): a run "
                        "continues on a label set that holds all its labels (retire a label first to leave it out)")
    return run_ids


@dataclass
class RunStart:
    """Where a run that starts from a finished run takes its weights and rows from."""

    run: RunDir
    run_labels: int  # the finished run's L
    run_ids: np.ndarray  # (L,) the finished run's id of each label of this run; -1 for a new label

    @classmethod
    def read(cls, run: RunDir, names: list[str] | None, num_labels: int) -> "RunStart":
        """The finished run `run`, verified, its labels matched to this run's (`names`, or None)."""
        card = run.read_card()  # verified
        run_names = run.read_label_names(card.num_labels)
        names = [one_line(name) for name in names] if names is not None else None  # as label_names.txt holds them
        start = cls(run, card.num_labels,
                    match_labels(run_names, card.num_labels, names, num_labels, run.read_retired()))
        log.info("starting from the run at %s: %d of its labels matched by %s, %d new", run,
                 num_labels - start.num_new, "name" if names and run_names else "id", start.num_new)
        return start

    @property
    def num_new(self) -> int:
        return int((self.run_ids < 0).sum())

    @property
    def encoder_weights(self) -> Path:
        return self.run.encoder_weights

    def load_rows(self, table) -> None:
        """The rows (and their optimizer state) of the run's labels into this rank's shard of `table`."""
        table.load_matched(self.run.table, self.run_ids[table.start:table.end])

    def map_new_rows(self, table) -> None:
        """This shard's new rows, label-text embeddings (table.init), through the map from text embeddings to trained
        rows that `labels add` uses (astra_ds/labels/text_to_row.py), so that they start like trained rows instead
        of outranking them. The map is fitted on a sample of the run's labels: their rows in the run, their text
        embeddings as table.init left them in this run's table (summed over the ranks that hold them, so that every
        rank fits the same map). Every rank calls it."""
        if not self.num_new:
            return
        ranges = fit_ranges(self.run_labels)
        labels = np.full(self.run_labels, -1)  # this run's label of each of the run's labels (-1: left out)
        matched = np.flatnonzero(self.run_ids >= 0)
        labels[self.run_ids[matched]] = matched
        labels = labels[np.concatenate([np.arange(r.start, r.stop) for r in ranges])]
        owned = np.flatnonzero((labels >= table.start) & (labels < table.end))
        texts = torch.zeros(len(labels), table.dim)
        texts[owned] = table.rows[labels[owned] - table.start].float()
        texts = sum_tensor_across_ranks(texts, table.device)
        found = torch.from_numpy(labels >= 0)
        text_to_row = fit_text_to_row(texts[found], read_stored_rows(self.run.table, ranges)[found])
        new_rows = torch.from_numpy(np.flatnonzero(self.run_ids[table.start:table.end] < 0))
        mapped = table.rows.index_select(0, new_rows).double() @ text_to_row
        table.rows.index_copy_(0, new_rows, mapped.to(table.rows.dtype))
