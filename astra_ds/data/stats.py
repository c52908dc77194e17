"""A dataset summarised in a few lines (`astra-ds data stats`): labels, queries, positives and their spread."""

from __future__ import annotations

import numpy as np

from astra_ds.data.readers import XCDataset


def summary_lines(dataset: XCDataset) -> list[str]:
    """The dataset's label count, then one line a split."""
    lines = [f"dataset {dataset.name}: {dataset.num_labels} labels, label texts: "
             f"{'yes' if dataset.label_texts is not None else 'no'}"]
    for name, split in (("train", dataset.train), ("test", dataset.test)):
        per_point = np.diff(split.labels.indptr)
        per_label = np.asarray((split.labels != 0).sum(axis=0)).ravel()
        words = np.array([len(t.split()) for t in split.texts])
        lines.append(f"  {name}: {len(split.texts)} queries, {split.labels.nnz} positives | labels/query "
                     f"mean {per_point.mean():.2f} max {per_point.max()} | queries without labels "
                     f"{(per_point == 0).sum()} | queries/label mean {per_label.mean():.2f} max {per_label.max()} "
                     f"| labels never seen {(per_label == 0).sum()} | words/query mean {words.mean():.1f} max "
                     f"{words.max()}")
    return lines
