"""The server's request bodies, checked before anything is queued: a client's mistake is answered with its
status and a JSON error naming the field, never a 500.

    {"error": {"status": 400, "field": "texts[2]", "message": "must be a string, not int"}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass


class ClientError(Exception):
    def __init__(self, status: int, field: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}

    def body(self) -> dict:
        return {"error": {"status": self.status, "field": self.field, "message": self.message}}


@dataclass(frozen=True)
class Limits:
    max_texts: int = 64  # texts a request
    max_chars: int = 2000  # characters a text
    max_body_bytes: int = 1 << 20


def _type_name(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def parse_body(body: bytes, limits: Limits) -> dict:
    if len(body) > limits.max_body_bytes:
        raise ClientError(413, None, f"the body is {len(body)} bytes, at most {limits.max_body_bytes}")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ClientError(400, None, f"the body is not JSON: {err}") from None
    except RecursionError:
        raise ClientError(400, None, "the body's JSON is nested too deeply") from None
    if not isinstance(value, dict):
        raise ClientError(400, None, f"the body must be a JSON object, not {_type_name(value)}")
    return value


def texts_of(request: dict, limits: Limits) -> list[str]:
    texts = request.get("texts")
    if texts is None:
        raise ClientError(400, "texts", "is required: a list of strings")
    if not isinstance(texts, list):
        raise ClientError(400, "texts", f"must be a list of strings, not {_type_name(texts)}")
    if not texts:
        raise ClientError(400, "texts", "must hold at least one text")
    if len(texts) > limits.max_texts:
        raise ClientError(413, "texts", f"holds {len(texts)} texts, at most {limits.max_texts} a request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ClientError(400, f"texts[{i}]", f"must be a string, not {_type_name(text)}")
        if not text.strip():
            raise ClientError(400, f"texts[{i}]", "is empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # valid JSON ("\\ud800"), but no text: it would fail its whole batch
            raise ClientError(400, f"texts[{i}]", f"holds a lone surrogate ({text[err.start]!r}), which is "
                                                  "not a character") from None
        if len(text) > limits.max_chars:
            raise ClientError(413, f"texts[{i}]", f"has {len(text)} characters, at most {limits.max_chars}")
    return texts


def k_of(request: dict, num_labels: int, default: int = 5) -> int:
    k = request.get("k", default)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ClientError(400, "k", f"must be an integer, not {_type_name(k)}")
    if not 1 <= k <= num_labels:
        raise ClientError(400, "k", f"must be between 1 and the model's {num_labels} labels, not {k}")
    return k


def unknown_fields(request: dict, known: set[str]) -> None:
    extra = sorted(set(request) - known)
    if extra:
        raise ClientError(400, extra[0], f"is not a field of this request (fields: {', '.join(sorted(known))})")
