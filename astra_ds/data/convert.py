"""Write a dataset in another format (`astra-ds data convert`): raw text, the XC repository's JSON format, or
bag-of-words (each query's words counted; word order is lost). Filter files travel with the data. The pair-file
format (Mulan/LSML) is read-only.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from astra_ds.data.readers import XCDataset, write_sparse_file
from astra_ds.errors import DataError

SPLITS = (("train", "trn"), ("test", "tst"))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _write_lines(path: Path, lines) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def with_labels(dataset: XCDataset, label_ids: np.ndarray) -> XCDataset:
    """The dataset with only the labels `label_ids`, renumbered in that order (label i is old label
    label_ids[i]): the positives of the others are dropped, the queries stay."""
    def columns(matrix: sp.csr_matrix | None) -> sp.csr_matrix | None:
        return None if matrix is None else sp.csr_matrix(matrix[:, label_ids])

    texts = None if dataset.label_texts is None else [dataset.label_texts[i] for i in label_ids]
    return replace(dataset, train=replace(dataset.train, labels=columns(dataset.train.labels)),
                   test=replace(dataset.test, labels=columns(dataset.test.labels)), num_labels=len(label_ids),
                   label_texts=texts, test_filter=columns(dataset.test_filter),
                   train_filter=columns(dataset.train_filter))


def write_raw_text(dataset: XCDataset, out: Path) -> None:
    for split, prefix in SPLITS:
        part = getattr(dataset, split)
        _write_lines(out / f"{prefix}_X.txt", map(_one_line, part.texts))
        write_sparse_file(out / f"{prefix}_X_Y.txt", part.labels)
    if dataset.label_texts is not None:
        _write_lines(out / "Y.txt", map(_one_line, dataset.label_texts))


def write_xc_json(dataset: XCDataset, out: Path) -> None:
    for split, prefix in SPLITS:
        part = getattr(dataset, split)
        with gzip.open(out / f"{prefix}.json.gz", "wt", encoding="utf-8") as f:
            for i, text in enumerate(part.texts):
                lo, hi = part.labels.indptr[i], part.labels.indptr[i + 1]
                f.write(json.dumps({"uid": str(i), "title": text, "content": "",
                                    "target_ind": part.labels.indices[lo:hi].tolist(),
                                    "target_rel": part.labels.data[lo:hi].tolist()}, ensure_ascii=False) + "\n")
    names = dataset.label_texts or [str(label) for label in range(dataset.num_labels)]
    with gzip.open(out / "lbl.json.gz", "wt", encoding="utf-8") as f:
        for label, name in enumerate(names):
            f.write(json.dumps({"uid": str(label), "title": name}, ensure_ascii=False) + "\n")


def write_bow(dataset: XCDataset, out: Path) -> None:
    """Words (whitespace tokens) become features, their counts the values."""
    vocabulary: dict[str, int] = {}
    for split, _ in SPLITS:
        for text in getattr(dataset, split).texts:
            for word in text.split():
                vocabulary.setdefault(word, len(vocabulary))
    _write_lines(out / "Xf.txt", vocabulary)
    for split, prefix in SPLITS:
        part = getattr(dataset, split)
        rows, cols, values = [], [], []
        for i, text in enumerate(part.texts):
            for word, count in Counter(text.split()).items():
                rows.append(i)
                cols.append(vocabulary[word])
                values.append(count)
        features = sp.csr_matrix((np.asarray(values, np.float32), (rows, cols)), shape=(len(part.texts), len(vocabulary)))
        write_sparse_file(out / f"{prefix}_X_Xf.txt", features)
        write_sparse_file(out / f"{prefix}_X_Y.txt", part.labels)
    if dataset.label_texts is not None:
        _write_lines(out / "Y.txt", map(_one_line, dataset.label_texts))


WRITERS = {"raw_text": write_raw_text, "xc_json": write_xc_json, "bow": write_bow}


def convert(dataset: XCDataset, source: Path, out: Path, target: str) -> None:
    """`dataset` (read from `source`) written to the new directory `out` in format `target`."""
    if target not in WRITERS:
        raise DataError(f"cannot write the {target} format: the targets are {', '.join(WRITERS)}")
    if out.exists():
        raise DataError(f"{out} already exists: convert writes a new directory")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    WRITERS[target](dataset, tmp)
    for path in source.glob("filter_labels_*.txt*"):
        shutil.copyfile(path, tmp / path.name)
    tmp.rename(out)
