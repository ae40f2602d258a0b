"""Untrusted bytes -> a parsed JSON document, or the reason it was refused.

``daemon.readings`` validates documents against the feature schema; this module owns what
comes before: strict parsing (orjson: no NaN/Infinity, no numbers beyond a double), a
nesting limit checked without recursion, and the detection of duplicate keys that orjson
silently collapses. Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from itertools import chain

import orjson

MAX_DEPTH = 8  # a batch of nested readings needs 4 levels; orjson alone would allow 1,024
TOO_DEEP = f"JSON nesting is deeper than {MAX_DEPTH} levels"

# A JSON string literal, or an unterminated one up to the end of the payload. Possessive,
# and it cannot fail once it has its opening quote, so every byte is read once: a literal
# that had to end in '"' made each of an unterminated string's escaped quotes the start
# of another scan to the end, quadratic (a 64 KB payload of them held the GIL for 21 s).
_STRING_LITERAL = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_TO_PARENS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")

#: id() of a parsed object -> the keys it repeated (only keys the caller reads)
Duplicates = dict[int, tuple[str, ...]]


class RefusedError(Exception):
    """The payload cannot be read; ``reason`` is one of the decoder's reason codes."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def parse(payload: bytes, keys_read: frozenset[str]) -> tuple[object, Duplicates]:
    """The document and the duplicate keys (among ``keys_read``) of each object in it.

    Raises ``RefusedError`` (not_utf8, not_json, too_deep) for anything but strict JSON of at
    most ``MAX_DEPTH`` levels.
    """
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise RefusedError(*_why_unparseable(payload, exc)) from None
    strings, depth = shape(doc, MAX_DEPTH)
    if depth > MAX_DEPTH:
        raise RefusedError("too_deep", TOO_DEEP)
    # orjson silently keeps the last of duplicate keys. Without a backslash in the payload
    # every '"' in it delimits a string, so 2 quotes per key or string value found in the
    # parsed document means nothing was dropped. Otherwise the slow parser settles it;
    # valid readings never get there.
    if payload.count(b'"') != 2 * strings or b"\\" in payload:
        return _parse_tracking_duplicates(payload, keys_read)
    return doc, {}


def shape(root: object, limit: int) -> tuple[int, int]:
    """(keys + string values, nesting depth) of a parsed document, level by level.

    Iterative, so hostile nesting costs no recursion; stops once `limit` is exceeded. The
    two usual forms (a flat object; an object whose one array holds flat objects, a batch)
    are counted with C-level iteration only.
    """
    if type(root) is dict:
        kinds = list(map(type, root.values()))
        if dict not in kinds and list not in kinds:
            return len(root) + kinds.count(str), 1
        if dict not in kinds and kinds.count(list) == 1:
            inner = next(v for v in root.values() if type(v) is list)
            if inner and list(map(type, inner)).count(dict) == len(inner):
                values = list(map(type, chain.from_iterable(map(dict.values, inner))))
                if dict not in values and list not in values:
                    strings = sum(map(len, inner)) + values.count(str)
                    return len(root) + kinds.count(str) + strings, 3
    strings = 0
    depth = 0
    level = [root]
    while level and depth <= limit:
        depth += 1
        below: list[object] = []
        for node in level:
            members: Iterable[object]
            if type(node) is dict:
                strings += len(node)
                members = node.values()
            elif type(node) is list:
                members = node
            else:
                continue
            kinds = list(map(type, members))
            strings += kinds.count(str)
            if dict in kinds or list in kinds:
                below.extend(v for v in members if type(v) is dict or type(v) is list)
        level = below
    return strings, depth


def nesting_exceeds(payload: bytes, limit: int) -> bool:
    """True if the JSON text nests deeper than `limit`, checked without recursion.

    Drop string literals, keep only brackets, then peel innermost pairs: each pass lowers
    the depth of every balanced group by exactly one, all in C-level bytes operations.
    """
    brackets = _STRING_LITERAL.sub(b"", payload).translate(_TO_PARENS, _NOT_BRACKETS)
    for _ in range(limit):
        brackets = brackets.replace(b"()", b"")
        if not brackets:
            return False
    # Leftover pairs are nesting beyond the limit; lone brackets are for orjson to reject.
    return b"()" in brackets


def _why_unparseable(payload: bytes, exc: orjson.JSONDecodeError) -> tuple[str, str]:
    # orjson gives up at depth 1,024 with a generic error; name the real problem.
    if payload.count(b"{") + payload.count(b"[") > MAX_DEPTH and nesting_exceeds(
        payload, MAX_DEPTH
    ):
        return "too_deep", TOO_DEEP
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as err:
        return "not_utf8", f"payload is not UTF-8 (invalid byte at offset {err.start})"
    text = str(exc)
    text = text if len(text) <= 80 else text[:77] + "..."
    return "not_json", f"payload is not valid JSON: {text}"


def _parse_tracking_duplicates(
    payload: bytes, keys_read: frozenset[str]
) -> tuple[object, Duplicates]:
    """Re-parse with the json module, recording which objects repeat a key we read.

    Only reached after orjson accepted the payload, so the input is strict JSON of bounded
    depth and json.loads cannot hit its recursion or NaN quirks.
    """
    dups: Duplicates = {}

    def build(pairs: list[tuple[str, object]]) -> dict[str, object]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            repeated = []
            for key, _ in pairs:
                if key in seen and key in keys_read:
                    repeated.append(key)
                seen.add(key)
            if repeated:
                dups[id(obj)] = tuple(repeated)
        return obj

    return json.loads(payload.decode("utf-8"), object_pairs_hook=build), dups
