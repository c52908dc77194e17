"""Where `astra-ds data prepare` reads rows from: a source is cut into units of fixed row ranges, each read on its
own (by any worker, on any host), so that preparation runs in parallel and resumes unit by unit.

    LineSource     the raw-text layout (trn_X.txt + trn_X_Y.txt, tst_..., Y.txt), uncompressed: one pass finds the
                   byte offset of every unit's first line; a unit is then read by seeking there.
    MemorySource   every other layout (and gzipped files): the dataset read whole by its reader, the units cut from
                   it in memory (datasets that fit in memory: these layouts cannot be read from the middle).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from astra_ds.choices import READERS
from astra_ds.data.readers import detect_format, parse_pairs, read_dataset, read_raw_text
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


class LineSource:
    """The raw-text layout, read from the middle."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = {split: (_source_file(directory, f"{prefix}_X.txt"), _source_file(directory, f"{prefix}_X_Y.txt"))
                      for split, prefix in (("train", "trn"), ("test", "tst"))}
        if (directory / "Y.txt").is_file():
            self.files["labels"] = (directory / "Y.txt",)
        self.num_labels = self._header(self.files["train"][1])[1]

    @staticmethod
    def supports(directory: Path, fmt: str) -> bool:
        """Whether the data is in the raw-text layout, its files uncompressed (a gzipped file cannot be read from
        the middle)."""
        reader = READERS.get(detect_format(directory) if fmt == "auto" else fmt)
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

    def fingerprint(self) -> dict:
        """What a prepared unit depends on: each file's size and modification time."""
        return {str(path): [path.stat().st_size, path.stat().st_mtime_ns]
                for paths in self.files.values() for path in paths}

    def units(self, unit_rows: int) -> list[Unit]:
        units = []
        for split, paths in self.files.items():
            text_starts, rows = line_starts(paths[0], unit_rows)
            if len(paths) > 1:
                label_starts, label_rows = line_starts(paths[1], unit_rows, skip=1)
                header_rows = self._header(paths[1])[0]
                if not rows == label_rows == header_rows:
                    raise DataError(f"{paths[0]} has {rows} lines, {paths[1]} {label_rows} rows (its header says "
                                    f"{header_rows}): they must match")
                offsets = list(zip(text_starts, label_starts))
            else:
                offsets = [(start,) for start in text_starts]
            units += [Unit(split, i, i * unit_rows, min(unit_rows, rows - i * unit_rows), tuple(offset))
                      for i, offset in enumerate(offsets)]
        return units

    def read(self, unit: Unit) -> UnitRows:
        paths = self.files[unit.split]
        texts = _read_lines(paths[0], unit.offsets[0], unit.rows)
        if len(paths) == 1:
            return UnitRows(texts, None)
        labels = []
        for i, line in enumerate(_read_lines(paths[1], unit.offsets[1], unit.rows)):
            line_no = unit.first_row + i + 2  # the header is line 1
            labels.append(parse_pairs(line.split(), self.num_labels, paths[1], line_no, "label")[0])
        return UnitRows(texts, labels)


def _read_lines(path: Path, offset: int, rows: int) -> list[str]:
    with open(path, "rb") as f:
        f.seek(offset)
        lines = [f.readline() for _ in range(rows)]
    return [line.decode("utf-8", "replace").rstrip("\r\n") for line in lines]


class MemorySource:
    """Any layout astra_ds reads, read whole."""

    def __init__(self, directory: Path, fmt: str, text_fields: str, on_bad_text: str):
        self.directory = directory
        self.dataset = read_dataset(directory, fmt, text_fields, on_bad_text)
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
            return UnitRows(list(texts[rows]), None)
        part = labels[rows]
        return UnitRows(list(texts[rows]), [part.indices[part.indptr[i]:part.indptr[i + 1]].tolist()
                                            for i in range(part.shape[0])])


def open_source(path: str | os.PathLike, fmt: str, text_fields: str, on_bad_text: str) -> LineSource | MemorySource:
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"dataset directory not found: {directory}")
    if LineSource.supports(directory, fmt):
        return LineSource(directory)
    return MemorySource(directory, fmt, text_fields, on_bad_text)
