"""Reading training data from CSV files such as SKAB's.

Rules: a header row is required; the delimiter (``,`` or ``;``) is taken from the header
line; a time column (``datetime``, ``timestamp``, ``time`` or any column whose first value
parses as an ISO date) and label columns (``anomaly``, ``is_anomaly``, ``label``,
``changepoint``) are never features. The first label column present in that order is
returned as the labels. Every feature cell must be a finite number. A row with anything
else (an empty cell from a sensor dropout, ``NaN``, text, a missing cell) raises
:class:`TrainingError` that counts every such row and names the first few by line and
column, because silently dropping rows would change what "normal" means without anyone
noticing; with ``skip_bad_rows`` those rows are left out instead and listed in
``TrainingData.skipped``, for the caller to report.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from daemon.errors import TrainingError

TIME_COLUMNS = frozenset({"datetime", "timestamp", "time"})
LABEL_COLUMNS = ("anomaly", "is_anomaly", "label", "changepoint")
#: How many bad rows a message names (all are counted).
NAMED_ROWS = 5


@dataclass(frozen=True)
class TrainingData:
    X: NDArray[np.float64]
    features: tuple[str, ...]
    labels: NDArray[np.bool_] | None
    #: Rows left out with ``skip_bad_rows``: "line N: why", in file order.
    skipped: tuple[str, ...] = ()


class _BadRowError(ValueError):
    pass


def bad_rows(problems: Sequence[str]) -> str:
    """``problems`` counted, the first ``NAMED_ROWS`` named."""
    named = "; ".join(problems[:NAMED_ROWS])
    more = len(problems) - NAMED_ROWS
    return named + (f"; and {more} more" if more > 0 else "")


def load_csv(
    path: Path, features: Sequence[str] | None = None, *, skip_bad_rows: bool = False
) -> TrainingData:
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
    excluded |= {i for i, name in enumerate(header) if is_time_column(name, body[0], i)}
    if features is None:
        columns = [i for i in range(len(header)) if i not in excluded]
        text = [i for i in columns if _is_text_column(body, i)]
        if text:
            numeric = [header[i] for i in columns if i not in text]
            raise TrainingError(
                f"{path}: column(s) {[header[i] for i in text]} hold text, not readings "
                f"(e.g. {body[0][text[0]]!r}): leave them out of the file"
                + (f", or train on the others: --features {','.join(numeric)!r}"
                   if numeric else ""))
    else:
        missing = [f for f in features if f not in header]
        if missing:
            raise TrainingError(f"{path}: no column(s) {missing}; header has {header}")
        columns = [header.index(f) for f in features]
    if not columns:
        raise TrainingError(f"{path}: no feature columns left after excluding time/labels")
    x = np.empty((len(body), len(columns)))
    labels = np.zeros(len(body), dtype=bool) if label_idx is not None else None
    kept = 0
    problems: list[str] = []
    for r, row in enumerate(body):
        try:
            if len(row) != len(header):
                raise _BadRowError(f"{len(row)} cells, header has {len(header)}")
            x[kept] = [_number(row[col], header[col]) for col in columns]
            if labels is not None and label_idx is not None:
                labels[kept] = _number(row[label_idx], header[label_idx]) != 0
        except _BadRowError as exc:
            problems.append(f"line {r + 2}: {exc}")  # 1-based, after the header
            continue
        kept += 1
    if problems and (not skip_bad_rows or not kept):
        what = "no row is usable" if not kept else "fix them, or --skip-bad-rows leaves them out"
        raise TrainingError(f"{path}: {len(problems)} of {len(body)} rows cannot be used: "
                            f"{bad_rows(problems)}; {what}")
    return TrainingData(
        X=x[:kept],
        features=tuple(header[c] for c in columns),
        labels=None if labels is None else labels[:kept],
        skipped=tuple(problems),
    )


def _number(cell: str, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise _BadRowError(f"column {column!r}: not a number: {cell!r}") from None
    if not math.isfinite(value):
        raise _BadRowError(f"column {column!r}: not finite: {cell!r}")
    return value


def _is_text_column(body: list[list[str]], column: int, look: int = 20) -> bool:
    """No number among the column's first ``look`` filled cells, and at least 3 of them
    (a status or a name, not a reading; a few bad cells are left to the row-by-row
    check, which names each)."""
    cells = [row[column].strip() for row in body[:look] if len(row) > column]
    filled = [c for c in cells if c]
    return len(filled) >= 3 and not any(_is_number(c) for c in filled)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def is_time_column(name: str, first_row: list[str], index: int) -> bool:
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


def csv_files(folder: Path) -> list[Path]:
    """The CSV files in ``folder`` and its subfolders (SKAB's ``valve1/``, ``valve2/``,
    ``other/``; the one-file-per-device folders of ``anomalyd record``), in natural order
    of their paths (``2.csv`` before ``10.csv``); hidden files and folders
    (``.ipynb_checkpoints/``) are left out."""
    files = [
        p for p in folder.rglob("*")
        if p.suffix.lower() == ".csv" and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda p: _natural(p.relative_to(folder)))


def _natural(path: Path) -> list[tuple[int, int | str]]:
    """Sort key: each path part split into numbers (compared as numbers) and text."""
    key: list[tuple[int, int | str]] = []
    for part in path.parts:
        key += [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", part) if t]
        key.append((2, ""))  # a folder's own files and subfolders keep together
    return key
