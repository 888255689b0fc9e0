"""Strict JSON objects: what Python's ``json`` accepts, less what later steps cannot carry.

Python's ``json`` accepts more than JSON and more than the rest of a request's
path can handle, so :func:`loads_object` also refuses ``NaN``/``Infinity`` and
numbers that overflow a float (they would reach sampling parameters, or be
re-encoded as ``null`` by orjson), integers too long to convert, nesting deeper
than :data:`MAX_JSON_DEPTH` (``repr``, orjson and recursion limits fail on deep
nesting long before ``json`` does), and strings holding lone surrogates
(``"\\ud800"``: a valid JSON escape that no UTF-8 encoder, tokenizer or JSON
response can carry). It imports nothing of pdserve; ``common/errors.py`` turns
its :class:`InvalidJSON` into a 400.
"""

from __future__ import annotations

import json
import math
import re

MAX_JSON_DEPTH = 64
# A \uD800-\uDFFF escape: only then can a parsed string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


class InvalidJSON(ValueError):
    """The body is no JSON object this service can take; the message says why."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} does not fit a 64-bit float")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def loads_object(raw: bytes) -> dict:
    """The body as a JSON object, or :class:`InvalidJSON` saying what is wrong."""
    if not raw or raw.isspace():  # (no copy of a large body)
        raise InvalidJSON("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidJSON(f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidJSON(f"request body is not valid JSON: {_short(exc)}") from None
    if not isinstance(body, dict):
        raise InvalidJSON("request body must be a JSON object")
    # Each container needs an opening bracket: with few of them the walk is skipped.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth_exceeds(body, MAX_JSON_DEPTH):
        raise InvalidJSON(f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(body):
        raise InvalidJSON("request body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")
    return body


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def _children(node: object) -> list:
    if isinstance(node, dict):
        return [v for v in node.values() if isinstance(v, (dict, list))]
    if isinstance(node, list):
        return [v for v in node if isinstance(v, (dict, list))]
    return []


def _depth_exceeds(root: object, limit: int) -> bool:
    """Whether containers nest more than ``limit`` deep (iterative: no recursion)."""
    level, depth = [root], 1
    while level:
        if depth > limit:
            return True
        level = [child for node in level for child in _children(node)]
        depth += 1
    return False


def _has_lone_surrogate(root: object) -> bool:
    try:
        # Parsed pairs are already joined into one character; what is left alone fails to encode.
        json.dumps(root, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
