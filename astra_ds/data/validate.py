"""What `astra-ds data validate` reports on a dataset beyond what reading it checks (header and row counts, id
ranges, malformed lines: a reader stops at the first with one line): queries without labels, labels without
training points, test labels never seen in training, filter pairs, and how many queries data.max_len truncates."""

from __future__ import annotations

import numpy as np

from astra_ds.data.readers import XCDataset, bad_text


def _share(part: int, whole: int) -> str:
    return f"{part} ({100 * part / max(whole, 1):.1f}%)"


def validate(dataset: XCDataset, tokenizer, max_len: int, label_max_len: int) -> tuple[list[str], list[str]]:
    """(report lines, warnings); `max_len`, `label_max_len`: the token budgets of queries and label texts."""
    lines, warnings = [], []
    train_counts = np.asarray((dataset.train.labels != 0).sum(axis=0)).ravel()
    test_counts = np.asarray((dataset.test.labels != 0).sum(axis=0)).ravel()
    lines.append(f"{dataset.num_labels} labels, label texts: {'yes' if dataset.label_texts is not None else 'no'}; "
                 "header and row counts, id ranges: ok")
    for name, split in (("train", dataset.train), ("test", dataset.test)):
        empty = int((np.diff(split.labels.indptr) == 0).sum())
        blank = sum(1 for text in split.texts if not text.strip())
        lines.append(f"{name}: {len(split.texts)} queries, {split.labels.nnz} positives; without labels "
                     f"{_share(empty, len(split.texts))}; empty texts {blank}")
        if blank:
            warnings.append(f"{blank} {name} queries have an empty text")
        if empty and name == "train":
            warnings.append(f"{empty} training queries have no labels (they contribute negatives only)")
    undecodable = bad_text(dataset)
    lines.append("texts with bytes that are not UTF-8: " + (", ".join(
        f"{len(found)} {name} (first at line {found[0]})" for name, found in undecodable.items()) or "none"))
    warnings += [f"{len(found)} {name} hold bytes that are not UTF-8, read as U+FFFD (data.on_bad_text=error "
                 "refuses them)" for name, found in undecodable.items()]
    untrained = int((train_counts == 0).sum())
    unseen = (train_counts == 0) & (test_counts > 0)
    lines.append(f"labels without training points: {_share(untrained, dataset.num_labels)}; test labels never "
                 f"seen in training: {int(unseen.sum())}, {_share(int(test_counts[unseen].sum()), dataset.test.labels.nnz)}"
                 " of the test positives")
    if unseen.any():
        warnings.append(f"{int(unseen.sum())} test labels never occur in training: their rows learn from label texts "
                        "and negatives only")
    for name, matrix in (("test", dataset.test_filter), ("train", dataset.train_filter)):
        if matrix is not None:
            lines.append(f"filter_labels_{name}.txt: {matrix.nnz} pairs (left out of the evaluation)")
    for name, texts, budget in (("train", dataset.train.texts, max_len), ("test", dataset.test.texts, max_len),
                                ("label", dataset.label_texts or [], label_max_len)):
        if texts:
            lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]])
            truncated = int((lengths > budget).sum())
            q50, q90, q99 = np.percentile(lengths, [50, 90, 99])
            lines.append(f"tokens a {name} text: p50 {q50:.0f}, p90 {q90:.0f}, p99 {q99:.0f}, max {lengths.max()}; "
                         f"truncated by {budget} tokens: {_share(truncated, len(texts))}")
            if name != "label" and truncated > 0.1 * len(texts):
                warnings.append(f"data.max_len={max_len} truncates {_share(truncated, len(texts))} {name} queries")
    return lines, warnings
