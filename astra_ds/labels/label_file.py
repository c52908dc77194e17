"""The labels a user adds to a finished run, read from a file (`astra-ds labels add --labels FILE`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from astra_ds.errors import UserError
from astra_ds.files import utf8_lines


@dataclass
class NewLabels:
    texts: list[str]
    names: list[str]  # the text itself where the file gave no name


def read_label_file(path: Path) -> NewLabels:
    """One label a line: its text; or `name<TAB>text`; or JSON lines {"text": ..., "name": ...} ("name" optional).
    UTF-8 (a line with other bytes is refused, naming it); blank lines are skipped."""
    if not path.is_file():
        raise UserError(f"no label file at {path}")
    texts, names = [], []
    for number, line in enumerate(utf8_lines(path.read_bytes(), str(path)), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
                text, name = record["text"], record.get("name", record["text"])
            except (ValueError, KeyError, TypeError):
                raise UserError(f'{path}, line {number}: not a JSON object with a "text"') from None
        elif "\t" in line:
            name, text = line.split("\t", 1)
        else:
            name = text = line
        if not isinstance(text, str) or not text.strip() or not isinstance(name, str) or not name.strip():
            raise UserError(f"{path}, line {number}: an empty label text or name")
        texts.append(text.strip())
        names.append(name.strip())
    if not texts:
        raise UserError(f"{path} holds no label")
    return NewLabels(texts, names)
