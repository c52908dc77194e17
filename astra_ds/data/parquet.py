"""The Parquet layout: the XC JSON format's fields as columns. trn.parquet and tst.parquet hold a query a row
(`title`, optional `content`, `target_ind`: a list of label ids, optional `group`), lbl.parquet a label a row (its
`title`). Read whole to train on the files (readers.read_xc_parquet), or a row range at a time by `data prepare`
(sources.ParquetSource): pyarrow reads only the row groups that hold the range; readers.query_fields parses
each record as it parses a JSON line. pyarrow is an optional extra, needed for these files alone."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from astra_ds.errors import DataError

NAMES = {"train": "trn.parquet", "test": "tst.parquet", "labels": "lbl.parquet"}
COLUMNS = ("title", "content", "target_ind", "group")


def _parquet():
    try:
        import pyarrow.parquet
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'astra_ds[parquet]'") from None
    return pyarrow.parquet


class ParquetRows:
    """One split's file: its rows, and any range of them parsed."""

    def __init__(self, directory: Path, split: str):
        self.path = directory / NAMES[split]
        if not self.path.is_file():
            raise DataError(f"{directory}: {NAMES[split]} is missing")
        parquet = _parquet()
        try:
            self.file = parquet.ParquetFile(self.path)
        except Exception as err:  # pyarrow raises its own errors for a damaged or foreign file
            raise DataError(f"{self.path}: not a readable Parquet file ({err})") from None
        metadata = self.file.metadata
        self.rows = metadata.num_rows
        self.group_starts = np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
        self.columns = [name for name in COLUMNS if name in self.file.schema_arrow.names]
        if "title" not in self.columns:
            raise DataError(f"{self.path}: no 'title' column")

    def records(self, first: int, rows: int) -> Iterator[tuple[str, dict]]:
        """(where, record) of rows [first, first + rows): where names the row in an error (readers.query_fields
        parses the record)."""
        if rows == 0:
            return
        row_groups = np.searchsorted(self.group_starts, np.arange(first, first + rows), "right") - 1
        groups = list(range(int(row_groups[0]), int(row_groups[-1]) + 1))
        table = self.file.read_row_groups(groups, columns=self.columns)
        table = table.slice(first - int(self.group_starts[groups[0]]), rows)
        values = {name: table.column(name).to_pylist() for name in self.columns}
        for i, group in enumerate(row_groups.tolist()):
            yield (f"{self.path}: row {first + i} (row group {group})",
                   {name: column[i] for name, column in values.items()})
