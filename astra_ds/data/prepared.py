"""A prepared directory read (astra_ds/data/preparation.py writes it): only its manifest at start-up; each part's
arrays memory-mapped unit by unit when first used, so that a process holds no O(N) private memory for the data
and every rank of a host shares one page cache of it. A batch gathers its rows from the units they are in."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from astra_ds.data.queries import QueryStats
from astra_ds.digests import file_digest
from astra_ds.data.preparation import FORMAT, LABEL_COUNTS, MANIFEST, UNITS, changed_arrays
from astra_ds.errors import DataError


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class PreparedPart:
    """The rows of one part (train, validation, test, labels), global row r in unit searchsorted(starts, r)."""

    def __init__(self, directory: Path, name: str, entry: dict, num_labels: int, pad_id: int = 0):
        self.directory, self.name, self.num_labels, self.pad_id = directory, name, num_labels, pad_id
        self.unit_names = [unit["name"] for unit in entry["units"]]
        self.starts = np.concatenate([[0], np.cumsum([unit["rows"] for unit in entry["units"]])]).astype(np.int64)
        self.entry = entry
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _array(self, unit: int, name: str) -> np.ndarray:
        key = (unit, name)
        if key not in self._arrays:
            path = self.directory / UNITS / self.unit_names[unit] / f"{self.name}.{name}.npy"
            try:
                self._arrays[key] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise DataError(f"cannot read {path} of the prepared data: {err}") from None
        return self._arrays[key]

    def _by_unit(self, rows: np.ndarray):
        """(unit, positions in `rows`, local rows) for each unit that `rows` touch."""
        rows = np.asarray(rows, dtype=np.int64)
        units = np.searchsorted(self.starts, rows, side="right") - 1
        for unit in np.unique(units):
            where = np.flatnonzero(units == unit)
            yield int(unit), where, rows[where] - self.starts[unit]

    def _ragged(self, rows: np.ndarray, values: str, offsets: str) -> tuple[list[np.ndarray], np.ndarray]:
        """The rows' slices of the ragged array `values`, in the order of `rows`, and their lengths."""
        out: list[np.ndarray] = [np.empty(0)] * len(rows)
        for unit, where, local in self._by_unit(rows):
            starts = self._array(unit, offsets)
            array = self._array(unit, values)
            for position, row in zip(where, local):
                out[position] = array[starts[row]:starts[row + 1]]
        return out, np.array([len(r) for r in out], dtype=np.int64)

    def token_ids(self, rows: np.ndarray) -> list[np.ndarray]:
        """Each row's token ids (special tokens included), in the order of `rows`."""
        return self._ragged(rows, "tokens", "token_offsets")[0]

    def stats(self) -> QueryStats:
        """From the manifest: no row is read."""
        per_query = self.entry.get("labels_histogram") or [0]
        return QueryStats(len(self), self.entry.get("positives", 0), self.longest(), per_query[0])

    def longest(self) -> int:
        return len(self.entry["length_histogram"]) - 1

    def lengths_of(self, rows: np.ndarray) -> np.ndarray:
        out = np.zeros(len(rows), np.int64)
        for unit, where, local in self._by_unit(rows):
            out[where] = self._array(unit, "lengths")[local]
        return out

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask of `rows`, padded to the longest of them (as TokenizedTexts.batch)."""
        tokens, lengths = self._ragged(rows, "tokens", "token_offsets")
        width = int(lengths.max()) if len(rows) else 1
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        for i, row in enumerate(tokens):
            input_ids[i, :len(row)] = row
        attention_mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]).long()
        return torch.from_numpy(input_ids), attention_mask

    def has(self, array: str) -> bool:
        return all(array in unit["digests"] for unit in self.entry["units"])

    def text(self, row: int) -> str:
        """The text of `row` (the label texts' part holds them)."""
        (names,), _ = self._ragged(np.array([row]), "names", "name_offsets")
        return bytes(names).decode("utf-8")

    def texts(self) -> "PartTexts":
        return PartTexts(self)

    def labels(self, rows: np.ndarray) -> sp.csr_matrix:
        """The positives of `rows`, (len(rows), num_labels), 1.0 each."""
        labels, counts = self._ragged(rows, "labels", "label_offsets")
        indptr = np.concatenate([[0], np.cumsum(counts)])
        indices = np.concatenate(labels).astype(np.int32) if len(labels) else np.zeros(0, np.int32)
        return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(rows), self.num_labels))


class PartTexts(Sequence):
    """The texts of a part, read from its memory-mapped bytes as they are asked for (not held as Python strings)."""

    def __init__(self, part: PreparedPart):
        self.part = part

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self.part.text(r) for r in range(*row.indices(len(self)))]
        if not -len(self) <= row < len(self):
            raise IndexError(row)
        return self.part.text(row % len(self))

    def __iter__(self):
        for unit in range(len(self.part.unit_names)):
            names, offsets = self.part._array(unit, "names"), self.part._array(unit, "name_offsets")
            data = names.tobytes()
            for start, end in zip(offsets[:-1], offsets[1:]):
                yield data[start:end].decode("utf-8")


class PreparedDirectory:
    """A prepared directory: its manifest, parts and label counts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{self.path} is not a prepared directory ({MANIFEST}: {err})") from None
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{self.path} was prepared by another version ({self.manifest.get('format')}, this one "
                            f"reads {FORMAT}): prepare it again")
        self.settings = self.manifest["settings"]
        self.num_labels = self.settings["num_labels"]
        self.fingerprint = self.manifest["fingerprint"]

    def mapped_bytes(self, name: str) -> int:
        """Bytes of a part's arrays on disk (what its pages take in the page cache once read): token ids, lengths,
        label ids and both offsets; 0 for a part the directory does not have."""
        entry = self.manifest["splits"].get(name)
        if entry is None:
            return 0
        offsets = 2 * 4 * (entry["rows"] + len(entry["units"]))
        return (entry["tokens"] * np.dtype(self.settings["token_dtype"]).itemsize + entry["rows"] * 2 + offsets
                + entry["positives"] * 4)

    def part(self, name: str, pad_id: int = 0) -> PreparedPart | None:
        entry = self.manifest["splits"].get(name)
        return None if entry is None else PreparedPart(self.path, name, entry, self.num_labels, pad_id)

    def damaged_units(self) -> list[str]:
        """Each unit array that is missing or whose digest is not the manifest's (reads every array once)."""
        return [str(path.relative_to(self.path)) for name, split in self.manifest["splits"].items()
                for unit in split["units"]
                for path in changed_arrays(self.path / UNITS / unit["name"], name, unit["digests"])]

    def test_filter(self) -> sp.csr_matrix | None:
        """The test split's (query, label) pairs left out of the evaluation, checked against their digest."""
        entry = self.manifest.get("test_filter")
        if entry is None:
            return None
        path = self.path / entry["file"]
        if not path.is_file() or file_digest(path) != entry["digest"]:
            raise DataError(f"{path} of the prepared data is missing or damaged: prepare the data again")
        return sp.load_npz(path).tocsr()

    @cached_property
    def label_counts(self) -> np.ndarray:
        """Training rows a label is a positive of (propensities need only these and the number of rows)."""
        return np.load(self.path / LABEL_COUNTS, mmap_mode="r")
