"""Where `astra-ds data prepare` reads rows from: a source is cut into units of fixed row ranges, each read on its
own (by any worker, on any host), so that preparation runs in parallel and resumes unit by unit.

    LineSource       the raw-text layout (trn_X.txt + trn_X_Y.txt, tst_..., Y.txt), uncompressed: one pass finds
                     the byte offset of every unit's first line; a unit is then read by seeking there.
    JsonLinesSource  the JSON-lines layout (trn.json, tst.json, lbl.json), uncompressed: the same, a row a line.
    ParquetSource    the Parquet layout (trn.parquet, ...): a unit read from the row groups that hold its rows.
    MemorySource     every other layout (and gzipped files): the dataset read whole by its reader, the units cut
                     from it in memory (datasets that fit in memory: these layouts cannot be read from the middle).

A row of these three is parsed on its own: a malformed one names its file and line, and ends the preparation
(data.on_bad_row=error) or is left out and counted (skip). Each row carries the key that the validation split
hashes: its number in the split, or its group's hash where the data names groups.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from astra_ds.choices import READERS
from astra_ds.config import DataConfig
from astra_ds.data.readers import (detect_format, json_fields, parse_json_row, parse_pairs, query_fields,
                                   read_dataset, read_raw_text, read_xc_json, read_xc_parquet)
from astra_ds.errors import DataError

SCAN_BLOCK = 16 << 20


@dataclass(frozen=True)
class Unit:
    """Rows [first_row, first_row + rows) of a split of the source ("train", "test", or "labels": the label texts);
    `offsets`: the byte offset of its first row in each of the split's files (LineSource)."""

    split: str
    index: int
    first_row: int
    rows: int
    offsets: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


@dataclass
class UnitRows:
    texts: list[str]
    labels: list[list[int]] | None  # each row's label ids (None for the label texts)
    keys: np.ndarray  # uint64 a row: what the validation split hashes (the row's number, or its group's hash)
    skipped: list[str] = field(default_factory=list)  # the malformed rows left out (data.on_bad_row=skip)

    @staticmethod
    def numbered(unit: Unit, texts: list[str], labels: list[list[int]] | None) -> "UnitRows":
        return UnitRows(texts, labels, np.arange(unit.first_row, unit.first_row + len(texts), dtype=np.uint64))


def group_key(group: str) -> int:
    """A group's validation key: a 64-bit hash of its name, above the row numbers' range in expectation."""
    return int.from_bytes(hashlib.blake2b(group.encode(), digest_size=8).digest(), "little")


def line_starts(path: Path, every: int, skip: int = 0) -> tuple[list[int], int]:
    """The byte offsets of lines skip, skip + every, skip + 2 every, ... of `path` (0-based), and its number of
    lines from line `skip` on; one pass over the file in blocks."""
    size = path.stat().st_size
    if size == 0:
        return [], 0
    starts, newlines, position, last = ([0] if skip == 0 else []), 0, 0, b""
    with open(path, "rb") as f:
        while block := f.read(SCAN_BLOCK):
            ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10).astype(np.int64) + position
            numbers = newlines + 1 + np.arange(len(ends))  # the line that begins after each newline
            keep = (ends + 1 < size) & (numbers >= skip) & ((numbers - skip) % every == 0)
            starts.extend((ends[keep] + 1).tolist())
            newlines += len(ends)
            position += len(block)
            last = block[-1:]
    lines = newlines + (0 if last == b"\n" else 1)
    return starts, max(0, lines - skip)


def _source_file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise DataError(f"{directory}: {name} is missing")
    return path


class _RowSource:
    """A source whose rows are parsed one at a time: `files[split]` are the split's files."""

    files: dict[str, tuple[Path, ...]]
    on_bad_row: str

    def fingerprint(self) -> dict:
        """What a prepared unit depends on: each file's size and modification time."""
        return {str(path): [path.stat().st_size, path.stat().st_mtime_ns]
                for paths in self.files.values() for path in paths}

    def _raw(self, unit: Unit):
        """The unit's rows as read, one item a row."""
        raise NotImplementedError

    def _parse(self, split: str, raw, row: int) -> tuple[str, list[int] | None, str | None]:
        """(text, label ids or None, group or None) of row `row`; a DataError names the file and line (or row
        group) of a malformed one."""
        raise NotImplementedError

    def read(self, unit: Unit) -> UnitRows:
        texts, labels, keys, skipped = [], [], [], []
        for row, raw in enumerate(self._raw(unit), unit.first_row):
            try:
                text, ids, group = self._parse(unit.split, raw, row)
            except DataError as err:
                if self.on_bad_row == "error" or unit.split == "labels":  # a label's row cannot go: ids would move
                    raise
                skipped.append(str(err))
                continue
            texts.append(text)
            labels.append(ids)
            keys.append(row if group is None else group_key(group))
        return UnitRows(texts, None if unit.split == "labels" else labels, np.array(keys, np.uint64), skipped)


class _LinesSource(_RowSource):
    """Line files read from the middle: a split's files are read in step, a line each (the first file's lines
    are the rows; the files after it have a header line)."""

    def _rows(self, paths: tuple[Path, ...], unit_rows: int) -> tuple[list[list[int]], int]:
        """The byte offsets of every unit's first line in each file, and the split's rows."""
        raise NotImplementedError

    def units(self, unit_rows: int) -> list[Unit]:
        units = []
        for split, paths in self.files.items():
            offsets, rows = self._rows(paths, unit_rows)
            units += [Unit(split, i, i * unit_rows, min(unit_rows, rows - i * unit_rows), tuple(offset))
                      for i, offset in enumerate(zip(*offsets))]
        return units

    def _raw(self, unit: Unit):
        return zip(*(_read_lines(path, offset, unit.rows) for path, offset in zip(self.files[unit.split],
                                                                                     unit.offsets)))


class LineSource(_LinesSource):
    """The raw-text layout, read from the middle."""

    def __init__(self, directory: Path, on_bad_row: str):
        self.directory, self.on_bad_row = directory, on_bad_row
        self.files = {split: (_source_file(directory, f"{prefix}_X.txt"), _source_file(directory, f"{prefix}_X_Y.txt"))
                      for split, prefix in (("train", "trn"), ("test", "tst"))}
        if (directory / "Y.txt").is_file():
            self.files["labels"] = (directory / "Y.txt",)
        self.num_labels = self._header(self.files["train"][1])[1]

    @staticmethod
    def supports(directory: Path, reader) -> bool:
        """Whether the data is in the raw-text layout (`reader`: the layout's reader), its files uncompressed (a
        gzipped file cannot be read from the middle)."""
        return reader is read_raw_text and all((directory / f"{prefix}_X{part}.txt").is_file()
                                                for prefix in ("trn", "tst") for part in ("", "_Y"))

    def _header(self, path: Path) -> tuple[int, int]:
        with open(path, "rb") as f:
            header = f.readline().decode("utf-8", "replace").split()
        try:
            rows, cols = (int(v) for v in header)
        except ValueError:
            raise DataError(f"{path}:1: header must be two counts 'N C', got {' '.join(header)!r}") from None
        return rows, cols

    def _rows(self, paths: tuple[Path, ...], unit_rows: int) -> tuple[list[list[int]], int]:
        text_starts, rows = line_starts(paths[0], unit_rows)
        if len(paths) == 1:
            return [text_starts], rows
        label_starts, label_rows = line_starts(paths[1], unit_rows, skip=1)
        header_rows = self._header(paths[1])[0]
        if not rows == label_rows == header_rows:
            raise DataError(f"{paths[0]} has {rows} lines, {paths[1]} {label_rows} rows (its header says "
                            f"{header_rows}): they must match")
        return [text_starts, label_starts], rows

    def _parse(self, split: str, lines: tuple[str, ...], row: int) -> tuple[str, list[int] | None, None]:
        if len(lines) == 1:
            return lines[0], None, None
        return lines[0], parse_pairs(lines[1].split(), self.num_labels, self.files[split][1], row + 2, "label")[0], None


class JsonLinesSource(_LinesSource):
    """The JSON-lines layout (read_xc_json's), read from the middle; a query's optional "group" field keys its
    side of the validation split."""

    NAMES = {"train": "trn.json", "test": "tst.json", "labels": "lbl.json"}

    def __init__(self, directory: Path, text_fields: str, on_bad_row: str):
        self.directory, self.on_bad_row, self.fields = directory, on_bad_row, json_fields(text_fields)
        self.files = {split: (_source_file(directory, name),) for split, name in self.NAMES.items()}
        self.num_labels = line_starts(self.files["labels"][0], 1 << 62)[1]

    @staticmethod
    def supports(directory: Path, reader) -> bool:
        return reader is read_xc_json and all((directory / name).is_file() for name in JsonLinesSource.NAMES.values())

    def _rows(self, paths: tuple[Path, ...], unit_rows: int) -> tuple[list[list[int]], int]:
        starts, rows = line_starts(paths[0], unit_rows)
        return [starts], rows

    def _parse(self, split: str, lines: tuple[str, ...], row: int) -> tuple[str, list[int] | None, str | None]:
        path = self.files[split][0]
        if split == "labels":
            return parse_json_row(lines[0], path, row + 1, ("title",), None)[0], None, None
        return parse_json_row(lines[0], path, row + 1, self.fields, self.num_labels)


def _read_lines(path: Path, offset: int, rows: int) -> list[str]:
    with open(path, "rb") as f:
        f.seek(offset)
        lines = [f.readline() for _ in range(rows)]
    return [line.decode("utf-8", "replace").rstrip("\r\n") for line in lines]


class ParquetSource(_RowSource):
    """The Parquet layout (astra_ds/data/parquet.py), a unit's rows read from the row groups that hold them."""

    def __init__(self, directory: Path, text_fields: str, on_bad_row: str):
        from astra_ds.data.parquet import ParquetRows

        self.on_bad_row, self.fields = on_bad_row, json_fields(text_fields)
        self.parts = {split: ParquetRows(directory, split) for split in ("train", "test", "labels")}
        self.files = {split: (rows.path,) for split, rows in self.parts.items()}
        self.num_labels = self.parts["labels"].rows

    @staticmethod
    def supports(directory: Path, reader) -> bool:
        return reader is read_xc_parquet

    def units(self, unit_rows: int) -> list[Unit]:
        return [Unit(split, i, first, min(unit_rows, rows.rows - first))
                for split, rows in self.parts.items() for i, first in enumerate(range(0, rows.rows, unit_rows))]

    def _raw(self, unit: Unit):
        return self.parts[unit.split].records(unit.first_row, unit.rows)

    def _parse(self, split: str, raw: tuple[str, dict], row: int) -> tuple[str, list[int] | None, str | None]:
        where, record = raw
        if split == "labels":
            return query_fields(record, where, ("title",), None)[0], None, None
        return query_fields(record, where, self.fields, self.num_labels)


class MemorySource:
    """Any layout astra_ds reads, read whole."""

    def __init__(self, directory: Path, data: DataConfig):
        self.directory = directory
        self.dataset = read_dataset(directory, data.format, data.text_fields, on_bad_text=None)  # counted per unit
        self.num_labels = self.dataset.num_labels

    def fingerprint(self) -> dict:
        return {str(path): [path.stat().st_size, path.stat().st_mtime_ns]
                for path in sorted(self.directory.iterdir()) if path.is_file()}

    def _split(self, split: str):
        if split == "labels":
            return self.dataset.label_texts, None
        part = getattr(self.dataset, split)
        return part.texts, part.labels

    def units(self, unit_rows: int) -> list[Unit]:
        units = []
        for split in ("train", "test", "labels"):
            texts, _ = self._split(split)
            if texts is None:
                continue
            units += [Unit(split, i, first, min(unit_rows, len(texts) - first))
                      for i, first in enumerate(range(0, len(texts), unit_rows))]
        return units

    def read(self, unit: Unit) -> UnitRows:
        texts, labels = self._split(unit.split)
        rows = slice(unit.first_row, unit.first_row + unit.rows)
        if labels is None:
            return UnitRows.numbered(unit, list(texts[rows]), None)
        part = labels[rows]
        return UnitRows.numbered(unit, list(texts[rows]), [part.indices[part.indptr[i]:part.indptr[i + 1]].tolist()
                                                           for i in range(part.shape[0])])


def open_source(data: DataConfig) -> LineSource | JsonLinesSource | ParquetSource | MemorySource:
    directory = Path(data.path)
    if not directory.is_dir():
        raise DataError(f"dataset directory not found: {directory}")
    reader = READERS.get(detect_format(directory) if data.format == "auto" else data.format)
    if LineSource.supports(directory, reader):
        return LineSource(directory, data.on_bad_row)
    if JsonLinesSource.supports(directory, reader):
        return JsonLinesSource(directory, data.text_fields, data.on_bad_row)
    if ParquetSource.supports(directory, reader):
        return ParquetSource(directory, data.text_fields, data.on_bad_row)
    return MemorySource(directory, data)
