"""Why a payload or reading was refused: the reason codes, and how problems are worded.

Every ``Rejection`` carries one stable snake_case ``reason`` from ``REASONS`` (the README
lists them; metrics and dead letters use them) and a short ``detail`` for people, which
quotes at most ~60 characters of the untrusted input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from types import MappingProxyType

from daemon.json_guard import MAX_DEPTH

MAX_ABS_VALUE = 1e15  # a feature's largest accepted magnitude
MAX_STATE_LEN = 64  # operational_state's longest accepted length
HINT_KEYS = 100  # keys of a payload searched for a missing feature's near namesake

# Every reason code a Rejection can carry, with its meaning (the README lists these).
REASONS: Mapping[str, str] = MappingProxyType({
    "bad_device_id": "the topic does not fit the subscription, or its id fails the pattern",
    "payload_too_large": "the payload exceeds max_payload_bytes (checked before parsing)",
    "not_utf8": "the payload is not valid UTF-8",
    "not_json": "not strict JSON: syntax error, NaN/Infinity, a number beyond a double, a BOM",
    "too_deep": f"JSON nesting deeper than {MAX_DEPTH} levels (the top level counts as 1)",
    "not_object": "the top level, sensor_data or a batch entry is not a JSON object",
    "duplicate_key": "a key this decoder reads appears twice in the same object",
    "bad_batch": "'readings' is not a non-empty array",
    "batch_too_large": "the batch has more than max_batch_readings entries",
    "missing_feature": "a schema feature is absent",
    "non_numeric_feature": "a feature value is not a JSON number (string, bool, null, ...)",
    "non_finite": "a feature value is NaN or infinite (JSON cannot carry these: see not_json)",
    "out_of_range": f"a feature value's magnitude exceeds {MAX_ABS_VALUE:g}",
    "bad_timestamp": "not ISO 8601 or epoch seconds within [2000-01-01, 2200-01-01) UTC",
    "bad_seq": "seq is not an integer in [0, 2**63)",
    "bad_operational_state": f"operational_state is not a string of <= {MAX_STATE_LEN} chars",
    "unknown_model": "model_name is not one of the loaded models",
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str  # stable snake_case code, one of REASONS
    detail: str  # human-readable; quotes at most ~60 characters of input
    index: int | None = None  # the entry inside a batch message, if any


def entry_fails(reason: str, detail: str, index: int | None) -> Rejection:
    return Rejection(reason, detail if index is None else f"readings[{index}]: {detail}", index)


def feature_problem(value: object, present: bool) -> tuple[str, str]:
    """The reason code and wording for a feature value the fast check refused."""
    if not present:
        return "missing_feature", "is missing"
    if type(value) is not float and type(value) is not int:
        return "non_numeric_feature", f"must be a number, got {show(value)}"
    # JSON cannot spell NaN/Infinity (orjson refuses the tokens and overflowing literals
    # as not_json), so this only guards against a future change of parser.
    if isinstance(value, float) and not math.isfinite(value):
        return "non_finite", f"is not finite ({value!r})"
    return "out_of_range", f"is {show(value)}, beyond ±{MAX_ABS_VALUE:g}"


def missing_hint(name: str, keys: Iterable[object]) -> str:
    """For a missing feature: a key of the payload that differs from its name only in case,
    spaces, ``_`` or ``-`` (a gateway that renamed it), quoted; else nothing. Looks at the
    first ``HINT_KEYS`` keys only (a hostile payload may have thousands)."""
    want = _loose(name)
    for key in islice(keys, HINT_KEYS):
        if isinstance(key, str) and key != name and _loose(key) == want:
            return f" (the payload has {show(key)}: feature names must match exactly)"
    return ""


def _loose(name: str) -> str:
    return "".join(c for c in name.casefold() if c not in " _-")


def dup_detail(key: str) -> str:
    return f"key {key!r} appears more than once in the same object"


def show(value: object) -> str:
    """Describe a JSON value for a detail message, quoting at most ~60 characters of it."""
    if isinstance(value, str):
        # repr of 60 characters can run to 600 (escapes), hence the second clip.
        return _clip(repr(value[:60]) + ("..." if len(value) > 60 else ""), 80)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if -(10**30) < value < 10**30 else "an integer of 30+ digits"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
