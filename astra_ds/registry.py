"""A registry of named choices (the registries themselves are in astra_ds/choices.py).

A registry maps each name a config may use to the object that implements it, written as "module:attribute" and
imported on first use: the config validates its choices against the names without importing torch or faiss.
"""

from __future__ import annotations

import importlib
from typing import Literal


class Registry:
    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind, self.entries = kind, entries

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def literal(self, *extra: str):
        """The names as a typing.Literal (with `extra` choices such as "auto"), for a config field."""
        return Literal[(*extra, *self.names)]

    def get(self, name: str):
        if name not in self.entries:
            raise KeyError(f"unknown {self.kind} {name!r} (registered: {', '.join(self.names)})")
        module, _, attribute = self.entries[name].partition(":")
        return getattr(importlib.import_module(module), attribute)
