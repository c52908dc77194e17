"""Readers for the extreme-classification file formats, with one-line errors for malformed input.

Layouts (chosen by `data.format`, or detected from the files present):
- raw_text: trn_X.txt, tst_X.txt (one query text a line), trn_X_Y.txt, tst_X_Y.txt (sparse label files:
  header "N L", then a line "l:v l:v ..." per query) and optional Y.txt (one label text a line).
- bow: the XC repository's bag-of-words files, either split (trn_X_Xf.txt / tst_X_Xf.txt with header "N F"
  and lines "f:v ...", plus trn_X_Y.txt / tst_X_Y.txt) or single-file (train.txt / test.txt with header
  "N F L" and lines "l,l f:v ..."). Queries become the text of their words from Xf.txt (feature names);
  labels take their text from Y.txt.
- xc_json: the XC repository's LF-* format: trn.json, tst.json (a JSON object a line: uid, title, content,
  target_ind), lbl.json (label titles); the query text is the title (data.text_fields: title_content adds the
  content).
- pairs: the Mulan/LSML files of ../shared/data (NAME_train_word.txt, NAME_train_label.txt: "doc id" pairs;
  NAME_test_leml.txt: "#num_feature=F num_label=L" then "l,l f:v ..."), with feature_names.txt and
  label_names.txt ("TAG_" prefixes are dropped from label texts).
All files may be gzipped (NAME.gz). Any format may add filter_labels_test.txt / filter_labels_train.txt ("point
label" lines): reciprocal pairs the evaluation leaves out, as the XC repository's does.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from astra_ds.choices import READERS
from astra_ds.errors import DataError

log = logging.getLogger("astra_ds")


@dataclass
class XCSplit:
    texts: list[str]  # one text per query
    labels: sp.csr_matrix  # (num_queries, num_labels), 1.0 where relevant


@dataclass
class XCDataset:
    name: str
    train: XCSplit
    test: XCSplit
    num_labels: int
    label_texts: list[str] | None  # None when the format has no label text
    # reciprocal pairs (query, label) the XC repository leaves out of evaluation: filter_labels_test.txt
    test_filter: sp.csr_matrix | None = None
    train_filter: sp.csr_matrix | None = None


def _resolve(path: Path) -> Path | None:
    """`path` or `path.gz`, whichever exists."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _open_text(path: Path) -> io.TextIOBase:
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
        return open(path, encoding="utf-8", errors="replace")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None


def _require(directory: Path, name: str) -> Path:
    path = _resolve(directory / name)
    if path is None:
        raise DataError(f"missing file {directory / name}")
    return path


def _ints(text: str, path: Path, line_no: int, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split()]
    except ValueError:
        raise DataError(f"{path}:{line_no}: {what} must be integers, got {text.strip()!r}") from None


def _numbered_lines(path: Path):
    """(line number, line) of a text file, gzipped or not; read errors become DataErrors naming the file."""
    try:
        with _open_text(path) as f:
            yield from enumerate(f, start=1)
    except (OSError, EOFError) as err:  # a corrupt or truncated gzip, an I/O error
        raise DataError(f"cannot read {path}: {err}") from None


def read_lines(path: Path) -> list[str]:
    """One entry per line, the line end (LF or CRLF) removed; bytes that are not UTF-8 become U+FFFD (see
    bad_text)."""
    return [line.rstrip("\r\n") for _, line in _numbered_lines(path)]


def parse_pairs(tokens: list[str], limit: int, path: Path, line_no: int, what: str) -> tuple[list[int], list[float]]:
    """Parse "id:value" tokens, checking 0 <= id < limit."""
    ids, values = [], []
    for token in tokens:
        idx, _, value = token.partition(":")
        try:
            i, v = int(idx), float(value) if value else 1.0
        except ValueError:
            raise DataError(f"{path}:{line_no}: cannot parse {what} entry {token!r} (expected id:value)") from None
        if not 0 <= i < limit:
            raise DataError(f"{path}:{line_no}: {what} id {i} out of range [0, {limit})")
        ids.append(i)
        values.append(v)
    return ids, values


def _csr(rows: list[list[int]], values: list[list[float]] | None, num_cols: int) -> sp.csr_matrix:
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    indices = np.fromiter((i for r in rows for i in r), dtype=np.int32, count=int(indptr[-1]))
    data = (np.ones(len(indices), np.float32) if values is None
            else np.fromiter((v for r in values for v in r), dtype=np.float32, count=int(indptr[-1])))
    matrix = sp.csr_matrix((data, indices, indptr), shape=(len(rows), num_cols))
    matrix.sum_duplicates()
    return matrix


def read_sparse_file(path: Path, what: str = "label") -> sp.csr_matrix:
    """An XC sparse file: header "N C", then N lines of "id:value" tokens (an empty line is an empty row)."""
    lines = _numbered_lines(path)
    _, header = next(lines, (1, ""))
    counts = _ints(header, path, 1, "the header (N C)")
    if len(counts) != 2 or min(counts) < 0:
        raise DataError(f"{path}:1: header must be two counts 'N C', got {header.strip()!r}")
    num_rows, num_cols = counts
    rows, values = [], []
    for line_no, line in lines:
        ids, vals = parse_pairs(line.split(), num_cols, path, line_no, what)
        rows.append(ids)
        values.append(vals)
    if len(rows) != num_rows:
        raise DataError(f"{path}: header says {num_rows} rows but the file has {len(rows)}")
    return _csr(rows, values, num_cols)


def write_sparse_file(path: Path, matrix: sp.csr_matrix) -> None:
    matrix = sp.csr_matrix(matrix)
    with open(path, "w") as f:
        f.write(f"{matrix.shape[0]} {matrix.shape[1]}\n")
        for i in range(matrix.shape[0]):
            lo, hi = matrix.indptr[i], matrix.indptr[i + 1]
            f.write(" ".join(f"{j}:{v:g}" for j, v in zip(matrix.indices[lo:hi], matrix.data[lo:hi])) + "\n")


def read_single_file(path: Path) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """XC single-file format: header "N F L" (or LEML "#num_feature=F num_label=L"), lines "l,l f:v ...".

    Returns (features, labels)."""
    lines = _numbered_lines(path)
    header = next(lines, (1, ""))[1].strip()
    if header.startswith("#"):
        try:
            fields = dict(item.split("=") for item in header[1:].split())
            num_rows, num_features, num_labels = None, int(fields["num_feature"]), int(fields["num_label"])
        except (ValueError, KeyError):
            raise DataError(f"{path}:1: expected '#num_feature=F num_label=L', got {header!r}") from None
    else:
        counts = _ints(header, path, 1, "the header (N F L)")
        if len(counts) != 3:
            raise DataError(f"{path}:1: header must be three counts 'N F L', got {header!r}")
        num_rows, num_features, num_labels = counts
    feature_rows, feature_values, label_rows = [], [], []
    for line_no, line in lines:
        tokens = line.split()
        label_part = tokens[0] if tokens and ":" not in tokens[0] else ""
        feature_tokens = tokens[1:] if label_part else tokens
        labels = _ints(label_part.replace(",", " "), path, line_no, "label ids")
        bad = [lab for lab in labels if not 0 <= lab < num_labels]
        if bad:
            raise DataError(f"{path}:{line_no}: label id {bad[0]} out of range [0, {num_labels})")
        ids, vals = parse_pairs(feature_tokens, num_features, path, line_no, "feature")
        label_rows.append(labels)
        feature_rows.append(ids)
        feature_values.append(vals)
    if num_rows is not None and len(label_rows) != num_rows:
        raise DataError(f"{path}: header says {num_rows} rows but the file has {len(label_rows)}")
    return _csr(feature_rows, feature_values, num_features), _csr(label_rows, None, num_labels)


def read_pair_file(path: Path, num_cols: int, num_rows: int | None = None, what: str = "label") -> sp.csr_matrix:
    """Lines of "doc_id col_id" (0-based). Rows count = num_rows, or the largest doc id + 1."""
    docs, cols = [], []
    for line_no, line in _numbered_lines(path):
        if not line.strip():
            continue
        pair = _ints(line, path, line_no, "doc and id")
        if len(pair) != 2:
            raise DataError(f"{path}:{line_no}: expected 'doc_id {what}_id', got {line.strip()!r}")
        if not 0 <= pair[1] < num_cols:
            raise DataError(f"{path}:{line_no}: {what} id {pair[1]} out of range [0, {num_cols})")
        if pair[0] < 0 or (num_rows is not None and pair[0] >= num_rows):
            raise DataError(f"{path}:{line_no}: doc id {pair[0]} out of range [0, {num_rows})")
        docs.append(pair[0])
        cols.append(pair[1])
    n = num_rows if num_rows is not None else (max(docs) + 1 if docs else 0)
    matrix = sp.csr_matrix((np.ones(len(docs), np.float32), (docs, cols)), shape=(n, num_cols))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def bow_to_texts(features: sp.csr_matrix, feature_names: list[str]) -> list[str]:
    """A query's text: its words, strongest feature first (ties by id)."""
    if features.shape[1] > len(feature_names):
        raise DataError(f"{features.shape[1]} features but only {len(feature_names)} feature names")
    texts = []
    for i in range(features.shape[0]):
        lo, hi = features.indptr[i], features.indptr[i + 1]
        ids, values = features.indices[lo:hi], features.data[lo:hi]
        order = np.lexsort((ids, -values))
        texts.append(" ".join(feature_names[j] for j in ids[order]))
    return texts


def _check_rows(texts: list[str], labels: sp.csr_matrix, text_path: Path, label_path: Path) -> None:
    if len(texts) != labels.shape[0]:
        raise DataError(f"{text_path} has {len(texts)} queries but {label_path} has {labels.shape[0]} rows")


def _check_label_counts(dataset: XCDataset, directory: Path) -> XCDataset:
    if dataset.test.labels.shape[1] != dataset.num_labels:
        raise DataError(f"{directory}: train has {dataset.num_labels} labels but test has {dataset.test.labels.shape[1]}")
    if dataset.label_texts is not None and len(dataset.label_texts) != dataset.num_labels:
        raise DataError(f"{directory}: {len(dataset.label_texts)} label texts for {dataset.num_labels} labels")
    return dataset


def _optional_lines(directory: Path, name: str) -> list[str] | None:
    path = _resolve(directory / name)
    return read_lines(path) if path else None


def read_raw_text(directory: Path, text_fields: str = "title") -> XCDataset:
    splits = {}
    for split, prefix in (("train", "trn"), ("test", "tst")):
        text_path, label_path = _require(directory, f"{prefix}_X.txt"), _require(directory, f"{prefix}_X_Y.txt")
        texts, labels = read_lines(text_path), read_sparse_file(label_path)
        _check_rows(texts, labels, text_path, label_path)
        splits[split] = XCSplit(texts, labels)
    label_texts = _optional_lines(directory, "Y.txt")
    return _check_label_counts(
        XCDataset(directory.name, splits["train"], splits["test"], splits["train"].labels.shape[1], label_texts), directory)


def read_bow(directory: Path, text_fields: str = "title") -> XCDataset:
    feature_names = read_lines(_require(directory, "Xf.txt"))
    splits = {}
    for split, prefix, single in (("train", "trn", "train.txt"), ("test", "tst", "test.txt")):
        single_path = _resolve(directory / single)
        if single_path:
            features, labels = read_single_file(single_path)
        else:
            features = read_sparse_file(_require(directory, f"{prefix}_X_Xf.txt"), what="feature")
            label_path = _require(directory, f"{prefix}_X_Y.txt")
            labels = read_sparse_file(label_path)
            if features.shape[0] != labels.shape[0]:
                raise DataError(f"{directory}: {prefix}_X_Xf.txt has {features.shape[0]} rows but {label_path.name} has {labels.shape[0]}")
        splits[split] = XCSplit(bow_to_texts(features, feature_names), labels)
    label_texts = _optional_lines(directory, "Y.txt")
    return _check_label_counts(
        XCDataset(directory.name, splits["train"], splits["test"], splits["train"].labels.shape[1], label_texts), directory)


def _pair_prefix(directory: Path) -> str:
    matches = sorted(directory.glob("*_train_word.txt*"))
    if not matches:
        raise DataError(f"{directory}: no NAME_train_word.txt file")
    return matches[0].name.split("_train_word.txt")[0]


def read_pairs(directory: Path, text_fields: str = "title") -> XCDataset:
    name = _pair_prefix(directory)
    feature_names = read_lines(_require(directory, "feature_names.txt"))
    label_texts = [t[4:] if t.startswith("TAG_") else t for t in read_lines(_require(directory, "label_names.txt"))]
    test_features, test_labels = read_single_file(_require(directory, f"{name}_test_leml.txt"))
    num_labels = test_labels.shape[1]
    train_features = read_pair_file(_require(directory, f"{name}_train_word.txt"), len(feature_names), what="feature")
    train_labels = read_pair_file(_require(directory, f"{name}_train_label.txt"), num_labels,
                                  num_rows=train_features.shape[0])
    dataset = XCDataset(name, XCSplit(bow_to_texts(train_features, feature_names), train_labels),
                        XCSplit(bow_to_texts(test_features, feature_names), test_labels), num_labels, label_texts)
    return _check_label_counts(dataset, directory)


def json_fields(text_fields: str) -> tuple[str, ...]:
    """The fields of a JSON query whose text is the query's (data.text_fields)."""
    return ("title", "content") if text_fields == "title_content" else ("title",)


def parse_json_row(line: str, path: Path, line_no: int, fields: tuple[str, ...],
                   num_labels: int | None) -> tuple[str, list[int], str | None]:
    """(text, label ids, group) of one line of a JSON-lines file (see query_fields)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{line_no}: not a JSON object ({err.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
    return query_fields(record, f"{path}:{line_no}", fields, num_labels)


def query_fields(record: dict, where: str, fields: tuple[str, ...],
                 num_labels: int | None) -> tuple[str, list[int], str | None]:
    """(text, label ids, group) of a record of the XC JSON schema (a JSON line, a Parquet row): its `fields`
    joined, its target_ind checked against [0, num_labels) (None: a label's record, which has none) and its
    optional "group" (queries of one group go to the same side of the validation split); `where` names the record
    in an error."""
    if record.get("title") is None:
        raise DataError(f"{where}: no 'title' field")
    text = " ".join(str(record.get(f) or "").replace("\n", " ").strip() for f in fields).strip()
    if num_labels is None:
        return text, [], None
    targets = record.get("target_ind", [])
    if not isinstance(targets, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in targets):
        raise DataError(f"{where}: target_ind must be a list of label ids")
    bad = [t for t in targets if not 0 <= t < num_labels]
    if bad:
        raise DataError(f"{where}: label id {bad[0]} out of range [0, {num_labels})")
    group = record.get("group")
    return text, targets, None if group is None else str(group)


def _json_lines(path: Path):
    """(line number, line) of a JSON-lines file's lines that hold anything."""
    return ((line_no, line) for line_no, line in _numbered_lines(path) if line.strip())


def queries_split(rows, num_labels: int) -> XCSplit:
    """The split of (text, label ids, group) rows; the label ids kept in flat arrays, not a list a row."""
    texts, indices, indptr = [], array("q"), array("q", [0])
    for text, targets, _ in rows:
        texts.append(text)
        indices.extend(targets)
        indptr.append(len(indices))
    labels = sp.csr_matrix((np.ones(len(indices), np.float32), np.asarray(indices, np.int32),
                            np.asarray(indptr, np.int64)), shape=(len(texts), num_labels))
    labels.sum_duplicates()
    labels.data[:] = 1.0
    return XCSplit(texts, labels)


def read_xc_json(directory: Path, text_fields: str = "title") -> XCDataset:
    """The XC repository's JSON format (LF-* datasets): trn.json, tst.json (a query a line: uid, title, content,
    target_ind), lbl.json (a label a line: its title is the label text); each read a line at a time, keeping
    only the text and the label ids."""
    fields = json_fields(text_fields)
    label_path = _require(directory, "lbl.json")
    label_texts = [parse_json_row(line, label_path, n, ("title",), None)[0] for n, line in _json_lines(label_path)]
    splits = {}
    for split, name in (("train", "trn.json"), ("test", "tst.json")):
        path = _require(directory, name)
        splits[split] = queries_split((parse_json_row(line, path, line_no, fields, len(label_texts))
                                       for line_no, line in _json_lines(path)), len(label_texts))
    return XCDataset(directory.name, splits["train"], splits["test"], len(label_texts), label_texts)


def read_xc_parquet(directory: Path, text_fields: str = "title") -> XCDataset:
    """The XC JSON format's fields as Parquet columns (astra_ds/data/parquet.py), read whole."""
    from astra_ds.data.parquet import ParquetRows

    fields = json_fields(text_fields)
    labels = ParquetRows(directory, "labels")
    label_texts = [query_fields(record, where, ("title",), None)[0] for where, record in labels.records(0, labels.rows)]
    splits = {}
    for split in ("train", "test"):
        rows = ParquetRows(directory, split)
        splits[split] = queries_split((query_fields(record, where, fields, len(label_texts))
                                       for where, record in rows.records(0, rows.rows)), len(label_texts))
    return XCDataset(directory.name, splits["train"], splits["test"], len(label_texts), label_texts)


def filter_path(directory: Path, split: str) -> Path | None:
    """The split's filter file (filter_labels_test.txt, gzipped or not), if the dataset has one."""
    return _resolve(directory / f"filter_labels_{split}.txt")


def _read_filters(dataset: XCDataset, directory: Path) -> XCDataset:
    """filter_labels_test.txt / filter_labels_train.txt ("point label" lines), when the directory has them."""
    for split, attr in (("test", "test_filter"), ("train", "train_filter")):
        path = filter_path(directory, split)
        if path is not None:
            rows = getattr(dataset, split).labels.shape[0]
            setattr(dataset, attr, read_pair_file(path, dataset.num_labels, num_rows=rows, what="label"))
    return dataset


def detect_format(directory: Path) -> str:
    if _resolve(directory / "trn.json") and _resolve(directory / "lbl.json"):
        return "xc_json"
    if (directory / "trn.parquet").is_file():
        return "xc_parquet"
    if _resolve(directory / "trn_X.txt"):
        return "raw_text"
    if _resolve(directory / "trn_X_Xf.txt") or _resolve(directory / "train.txt"):
        return "bow"
    if list(directory.glob("*_train_word.txt*")):
        return "pairs"
    raise DataError(f"{directory}: no known dataset format (expected trn.json + lbl.json, trn.parquet, trn_X.txt, "
                    f"trn_X_Xf.txt, train.txt or NAME_train_word.txt)")


def read_dataset(path: str | Path, fmt: str = "auto", text_fields: str = "title",
                 on_bad_text: str | None = "replace") -> XCDataset:
    """`text_fields` (the JSON format): the query text is the title, or title and content (title_content);
    `on_bad_text`: texts with bytes that are not UTF-8 are read with U+FFFD in their place and counted in a
    warning ("replace"), or end the reading in one line ("error"); None leaves them to the caller (the
    preparation counts them)."""
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"dataset directory not found: {directory}")
    fmt = detect_format(directory) if fmt == "auto" else fmt
    reader = READERS.get(fmt)
    dataset = _read_filters(reader(directory, text_fields), directory)  # text_fields: for the JSON format
    for texts, lines in (bad_text(dataset) if on_bad_text else {}).items():
        if on_bad_text == "error":
            raise DataError(f"{directory}: the {texts} hold bytes that are not UTF-8, first at line {lines[0]} "
                            f"({len(lines)} lines; data.on_bad_text=replace reads them with U+FFFD)")
        log.warning("%s: %d %s hold bytes that are not UTF-8 (read as U+FFFD), first at line %d", directory,
                    len(lines), texts, lines[0])
    return dataset


def bad_text(dataset: XCDataset) -> dict[str, list[int]]:
    """The lines (1-based, in the order of the queries or labels) whose text holds U+FFFD, the character that
    undecodable bytes were read as: by texts ("train texts", "test texts", "label texts"), those with any."""
    texts = {"train texts": dataset.train.texts, "test texts": dataset.test.texts,
             "label texts": dataset.label_texts or []}
    found = {name: [i for i, text in enumerate(values, 1) if "\ufffd" in text] for name, values in texts.items()}
    return {name: lines for name, lines in found.items() if lines}
