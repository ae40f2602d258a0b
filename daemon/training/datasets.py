"""Reading training data from CSV files such as SKAB's.

Rules: a header row is required; the delimiter (``,`` or ``;``) is taken from the header
line; a time column (``datetime``, ``timestamp``, ``time`` or any column whose first value
parses as an ISO date) and label columns (``anomaly``, ``is_anomaly``, ``label``,
``changepoint``) are never features. The first label column present in that order is
returned as the labels. Every feature cell must be a finite number: anything else raises
:class:`TrainingError` naming the line and column, because silently dropping rows would
change what "normal" means without anyone noticing.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from daemon.errors import TrainingError

TIME_COLUMNS = frozenset({"datetime", "timestamp", "time"})
LABEL_COLUMNS = ("anomaly", "is_anomaly", "label", "changepoint")


@dataclass(frozen=True)
class TrainingData:
    X: NDArray[np.float64]
    features: tuple[str, ...]
    labels: NDArray[np.bool_] | None


def load_csv(path: Path, features: Sequence[str] | None = None) -> TrainingData:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            header_line = fh.readline()
            delimiter = ";" if header_line.count(";") > header_line.count(",") else ","
            fh.seek(0)
            rows = list(csv.reader(fh, delimiter=delimiter))
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"{path}: cannot read: {exc}") from exc
    if len(rows) < 2:
        raise TrainingError(f"{path}: needs a header row and at least one data row")
    header = [name.strip() for name in rows[0]]
    if all(_is_number(name) for name in header):
        raise TrainingError(f"{path}: the first row must be a header of column names")
    body = rows[1:]
    lowered = {name.lower(): i for i, name in enumerate(header)}
    label_idx = next((lowered[c] for c in LABEL_COLUMNS if c in lowered), None)
    excluded = {i for i, name in enumerate(header) if name.lower() in LABEL_COLUMNS}
    excluded |= {i for i, name in enumerate(header) if _is_time_column(name, body[0], i)}
    if features is None:
        columns = [i for i in range(len(header)) if i not in excluded]
    else:
        missing = [f for f in features if f not in header]
        if missing:
            raise TrainingError(f"{path}: no column(s) {missing}; header has {header}")
        columns = [header.index(f) for f in features]
    if not columns:
        raise TrainingError(f"{path}: no feature columns left after excluding time/labels")
    x = np.empty((len(body), len(columns)))
    labels = np.zeros(len(body), dtype=bool) if label_idx is not None else None
    for r, row in enumerate(body):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            raise TrainingError(f"{path}:{line}: {len(row)} cells, header has {len(header)}")
        for c, col in enumerate(columns):
            x[r, c] = _number(row[col], path, line, header[col])
        if labels is not None and label_idx is not None:
            labels[r] = _number(row[label_idx], path, line, header[label_idx]) != 0
    return TrainingData(X=x, features=tuple(header[c] for c in columns), labels=labels)


def _number(cell: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise TrainingError(f"{path}:{line}: column {column!r}: not a number: {cell!r}") from None
    if not math.isfinite(value):
        raise TrainingError(f"{path}:{line}: column {column!r}: not finite: {cell!r}")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_time_column(name: str, first_row: list[str], index: int) -> bool:
    if name.lower() in TIME_COLUMNS:
        return True
    cell = first_row[index].strip() if index < len(first_row) else ""
    if _is_number(cell):
        return False
    try:
        datetime.fromisoformat(cell)
    except ValueError:
        return False
    return True
