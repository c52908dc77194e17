"""A dataset summarised in a few lines (`astra-ds data stats`): labels, queries, positives and their spread; for a
prepared directory, from its manifest and label counts alone."""

from __future__ import annotations

import numpy as np

from astra_ds.data.prepared import PreparedDirectory
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


def prepared_summary_lines(directory: PreparedDirectory) -> list[str]:
    """The prepared directory's settings, then one line a part (from the manifest's histograms)."""
    settings, splits = directory.settings, directory.manifest["splits"]
    labels = splits.get("labels", {}).get("rows", 0)
    lines = [f"prepared dataset {directory.path}: {directory.num_labels} labels, label texts: "
             f"{'yes' if labels else 'no'} | {settings['encoder']} tokens, max_len {settings['max_len']}, "
             f"validation_fraction {settings['validation_fraction']}"]
    for name in ("train", "validation", "test"):
        if name not in splits or (name == "validation" and not splits[name]["rows"]):
            continue
        split = splits[name]
        lengths = np.asarray(split["length_histogram"], np.int64)
        per_query = np.asarray(split["labels_histogram"] or [0], np.int64)
        rows = max(1, split["rows"])
        line = (f"  {name}: {split['rows']} queries, {split['positives']} positives | labels/query mean "
                f"{split['positives'] / rows:.2f} max {len(per_query) - 1} | queries without labels {per_query[0]} | "
                f"tokens/query mean {split['tokens'] / rows:.1f} max {len(lengths) - 1}")
        if name == "train":
            counts = np.asarray(directory.label_counts)
            line += f" | queries/label mean {counts.mean():.2f} max {counts.max()} | labels never seen " \
                    f"{(counts == 0).sum()}"
        lines.append(line)
    skipped = {split: n for split, n in directory.manifest.get("skipped_rows", {}).items() if n}
    if skipped:
        lines.append("  malformed rows left out (data.on_bad_row=skip): "
                     + ", ".join(f"{n:,} {split}" for split, n in skipped.items()))
    return lines
