"""Reading training data from CSV files such as SKAB's.

Rules: a header row of distinct column names is required; the delimiter (``,`` or ``;``)
is the one that splits the header line into more columns (quoted names may hold the
other); with ``;`` a decimal comma (``45,3``) is read as a decimal point. Blank lines are
passed over, and so is an unnamed empty last column (a ``;`` ending every line). One
reader (:func:`open_table`) serves training, evaluation and ``anomalyd score``, and says
plainly what a file is when it is not CSV text (a workbook, a compressed file, another
text encoding). A time column (one named like ``datetime``, ``timestamp``, ``time``,
``ts``, ``date``, or whose first value parses as an ISO date, or whose first values are
epoch seconds or milliseconds, never decreasing), label columns (``anomaly``,
``is_anomaly``, ``label``, ``changepoint``) and a device column (``device_id``,
``device``, ``asset``, ``asset_id``: the rows of several devices, each windowed on its
own) are never features, nor is a data frame's row number (``Unnamed: 0``, ``index``)
unless named in ``features``. The first label column present in that order is
returned as the labels. Every feature cell must be a finite number. A row with anything
else (an empty cell from a sensor dropout, ``NaN``, text, a missing cell) raises
:class:`TrainingError` that counts every such row and names the first few by line and
column, because silently dropping rows would change what "normal" means without anyone
noticing; with ``skip_bad_rows`` those rows are left out instead and listed in
``TrainingData.skipped``, for the caller to report.
"""

from __future__ import annotations

import csv
import itertools
import math
import re
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

import numpy as np
from numpy.typing import NDArray

from daemon.errors import TrainingError
from daemon.rejections import MAX_ABS_VALUE

TIME_COLUMNS = frozenset({"datetime", "timestamp", "time", "ts", "date", "date/time",
                          "date_time", "time_stamp", "epoch", "zeit", "datum"})
LABEL_COLUMNS = ("anomaly", "is_anomaly", "label", "changepoint")
#: A column naming each row's device (lower case), as ``anomalyd score`` reads it too.
DEVICE_COLUMNS = ("device_id", "device", "asset", "asset_id")
#: Epoch seconds (2001-09 to 2286) and milliseconds over the same span: a clock, not a
#: sensor, in a column whose first values never decrease.
EPOCH_SECONDS = (1e9, 1e10)
EPOCH_MILLISECONDS = (1e12, 1e13)
#: A row number a data frame wrote along (pandas' ``Unnamed: 0``): not a reading.
_INDEX_COLUMN = re.compile(r"unnamed: \d+|index")
#: A date, and maybe a time, in a local spelling (01.11.2026 08:00:00, 11/01/2026 8:00 AM):
#: a time column not read as one, not a device column to suggest.
_LOCAL_TIME = re.compile(r"\d{1,4}[./-]\d{1,2}[./-]\d{1,4}"
                         r"(?:[ T]\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:\s*[AaPp][Mm])?)?")
#: How many rows the column rules look at.
LOOK_ROWS = 20
_DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+(?:[eE][+-]?\d+)?")
#: What a file that is not CSV text starts with, and what it then is.
_MAGIC = ((b"\x1f\x8b", "a gzip-compressed file"),
          (b"PK\x03\x04", "an Excel workbook (.xlsx) or another zip archive"),
          (b"\xd0\xcf\x11\xe0", "an old Excel workbook (.xls)"))
#: How many bad rows a message names (all are counted).
NAMED_ROWS = 5


@dataclass(frozen=True)
class TrainingData:
    X: NDArray[np.float64]
    features: tuple[str, ...]
    labels: NDArray[np.bool_] | None
    #: Rows left out with ``skip_bad_rows``: "line N: why", in file order.
    skipped: tuple[str, ...] = ()
    #: Each kept row's device, where the file has a device column (else None).
    devices: tuple[str, ...] | None = None
    #: What a person training on the file should know (rows out of time order).
    notes: tuple[str, ...] = ()


@dataclass
class Table:
    """A CSV file's header and, lazily, its rows as (line number, cells)."""

    header: list[str]
    delimiter: str
    rows: Iterator[tuple[int, list[str]]]

    @property
    def decimal_comma(self) -> bool:
        return self.delimiter == ";"


@contextmanager
def open_table(path: Path) -> Iterator[Table]:
    """Open a CSV file (see the module's rules); TrainingError says what is wrong with it.

    An empty file gives an empty header."""
    if path.is_dir():
        raise TrainingError(f"{path}: is a folder, not a file")
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise TrainingError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    with fh:
        start = fh.read(8)
        for magic, what in _MAGIC:
            if start.startswith(magic):
                raise TrainingError(f"{path}: is {what}, not CSV text: export or save it as "
                                    "CSV (UTF-8) first")
        fh.seek(0)
        lines = _decoded(fh, path)
        header_line = next(lines, "")
        try:
            delimiter = max((",", ";"), key=lambda d: len(next(csv.reader([header_line],
                                                                            delimiter=d), [])))
            header = [name.strip() for name in next(csv.reader([header_line],
                                                                 delimiter=delimiter), [])]
        except csv.Error as exc:
            raise TrainingError(f"{path}: line 1, the header: {exc}") from exc
        trailing = len(header) > 1 and header[-1] == ""  # every line ends with a delimiter
        if trailing:
            header = header[:-1]
        empty = [i + 1 for i, name in enumerate(header) if not name]
        if empty:
            raise TrainingError(f"{path}: column(s) {empty} of the header have no name")
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:
            raise TrainingError(f"{path}: column name(s) {twice} appear more than once: "
                                "rename them so each column has its own")

        def rows() -> Iterator[tuple[int, list[str]]]:
            reader = csv.reader(lines, delimiter=delimiter)
            try:
                for row in reader:
                    if not row:
                        continue  # a blank line
                    if trailing and len(row) == len(header) + 1 and not row[-1].strip():
                        row = row[:-1]
                    yield reader.line_num + 1, row  # 1-based, after the header line
            except csv.Error as exc:  # e.g. a field over the csv module's size limit
                raise TrainingError(f"{path}: line {reader.line_num + 1}: {exc}") from exc

        yield Table(header, delimiter, rows())


def _decoded(fh: IO[bytes], path: Path) -> Iterator[str]:
    """The file's lines as text (UTF-8, a leading byte-order mark dropped), ended by
    ``\n``, ``\r\n`` or a lone ``\r`` (old spreadsheet exports)."""
    line = 0
    for chunk in fh:
        for raw in chunk.splitlines(keepends=True) if b"\r" in chunk[:-2] else (chunk,):
            line += 1
            try:
                yield raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise TrainingError(
                    f"{path}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x}): "
                    "save the file as CSV (UTF-8)") from exc


class _BadRowError(ValueError):
    pass


def bad_rows(problems: Sequence[str]) -> str:
    """``problems`` counted, the first ``NAMED_ROWS`` named."""
    named = "; ".join(problems[:NAMED_ROWS])
    more = len(problems) - NAMED_ROWS
    return named + (f"; and {more} more" if more > 0 else "")


def load_csv(
    path: Path, features: Sequence[str] | None = None, *, skip_bad_rows: bool = False,
    device: str | None = None,
) -> TrainingData:
    with open_table(path) as table:
        header, numbered = table.header, list(table.rows)
    if not numbered:
        raise TrainingError(f"{path}: needs a header row and at least one data row")
    if all(_is_number(name) for name in header):
        raise TrainingError(f"{path}: the first row must be a header of column names")
    comma = table.decimal_comma
    body = [row for _, row in numbered]
    lowered = {name.lower(): i for i, name in enumerate(header)}
    label_idx = next((lowered[c] for c in LABEL_COLUMNS if c in lowered), None)
    try:
        device_idx = device_column(header, features or (), device)
    except TrainingError as exc:
        raise TrainingError(f"{path}: {exc}") from None
    excluded = {i for i, name in enumerate(header) if name.lower() in LABEL_COLUMNS}
    times = [i for i, name in enumerate(header) if is_time_column(name, body, i)]
    excluded |= set(times)
    if device_idx is not None:
        excluded.add(device_idx)
    excluded |= {i for i, name in enumerate(header) if _INDEX_COLUMN.fullmatch(name.lower())}
    if features is None:
        columns = [i for i in range(len(header)) if i not in excluded]
        blank = [i for i in columns if not any(len(r) > i and r[i].strip() for r in body)]
        if blank:
            others = [header[i] for i in columns if i not in blank]
            raise TrainingError(
                f"{path}: column(s) {[header[i] for i in blank]} are empty in every row"
                + (f": leave them out of the file, or train on the others: --features "
                   f"{_listed(others)}" if others else ""))
        text = [i for i in columns if _is_text_column(body, i, comma)]
        if text:
            numeric = [header[i] for i in columns if i not in text]
            times = [i for i in text if _LOCAL_TIME.fullmatch(body[0][i].strip())]
            names = [i for i in text if i not in times]
            raise TrainingError(
                f"{path}: column(s) {[header[i] for i in text]} hold text, not readings "
                f"(e.g. {body[0][text[0]]!r})."
                + (f" {[header[i] for i in times]} hold times in a spelling not read as "
                   f"times (e.g. {body[0][times[0]]!r}): name the column timestamp, or "
                   "write its times as ISO 8601 (2026-11-01T08:00:00)." if times else "")
                + (f" If one names each row's device, give --device-column "
                   f"{header[names[0]]!r} (or name it device_id): each device is then "
                   "windowed on its own;" if names else "")
                + (" else" if names else " Or") + " leave them out of the file"
                + (f", or train on the others: --features {_listed(numeric)}"
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
    devices: list[str] = []
    kept = 0
    problems: list[str] = []
    for line, row in numbered:
        try:
            if len(row) != len(header):
                raise _BadRowError(f"{len(row)} cells, header has {len(header)}")
            x[kept] = [_number(row[col], header[col], comma) for col in columns]
            if labels is not None and label_idx is not None:
                labels[kept] = _number(row[label_idx], header[label_idx], comma) != 0
        except _BadRowError as exc:
            problems.append(f"line {line}: {exc}")
            continue
        if device_idx is not None:
            devices.append(row[device_idx].strip())
        kept += 1
    if problems and (not skip_bad_rows or not kept):
        what = "no row is usable" if not kept else "fix them, or --skip-bad-rows leaves them out"
        raise TrainingError(f"{path}: {len(problems)} of {len(body)} rows cannot be used: "
                            f"{bad_rows(problems)}; {what}")
    order = _time_order(numbered, times[0], header[times[0]], device_idx) if times else None
    notes = [order] if order else []
    return TrainingData(
        X=x[:kept],
        features=tuple(header[c] for c in columns),
        labels=None if labels is None else labels[:kept],
        skipped=tuple(problems),
        devices=tuple(devices) if device_idx is not None else None,
        notes=tuple(notes),
    )


def device_column(header: Sequence[str], features: Collection[str],
                  named: str | None = None) -> int | None:
    """The index of the column naming each row's device: ``named`` (``--device-column``;
    its exact name, else the one column of that name in any case; TrainingError if there
    is none), else one of ``DEVICE_COLUMNS`` (in that order of preference, any case), or
    None; a column named in ``features`` is a feature."""
    lowered = [name.lower() for name in header]
    if named is not None:
        if named in header:
            return header.index(named)
        if lowered.count(named.lower()) == 1:
            return lowered.index(named.lower())
        raise TrainingError(f"--device-column {named!r}: no such column; the columns are "
                            f"{list(header)}")
    return next((lowered.index(c) for c in DEVICE_COLUMNS
                 if c in lowered and header[lowered.index(c)] not in features), None)


def _time_order(numbered: Sequence[tuple[int, list[str]]], column: int, name: str,
                device: int | None) -> str | None:
    """What a person should know if each device's rows (the file's, without a ``device``
    column) do not follow their time column (windows are made in file order), or None;
    times that cannot be read are not judged."""
    back, same, first = 0, 0, None
    latest: dict[str, float] = {}
    for line, row in numbered:
        moment = _moment(row[column].strip()) if len(row) > column else None
        if moment is None:
            continue
        key = row[device].strip() if device is not None and len(row) > device else ""
        previous = latest.get(key)
        if previous is not None and moment < previous:
            back += 1
            first = first or line
        elif previous is not None and moment == previous:
            same += 1
        latest[key] = moment
    if not back and not same:
        return None
    parts = ([f"{back} row(s) go back in time (the first on line {first})"] if back else []) + (
        [f"{same} row(s) repeat the time before them"] if same else [])
    return (f"column {name!r}: {' and '.join(parts)}; windows are made in file order, so "
            "sort the file by time (and drop repeated rows) if this is not intended"
            + ("; if it holds several devices' rows, name the column that tells them apart "
               "(--device-column NAME)" if device is None else ""))


def _moment(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(cell).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _listed(names: Sequence[str]) -> str:
    """Names for ``--features``, quoted for a shell (one may hold a comma: refused there)."""
    return repr(",".join(names))


def number(cell: str, decimal_comma: bool = False) -> float:
    """A cell's number (ValueError if it is none); ``45,3`` too with ``decimal_comma``."""
    if decimal_comma and _DECIMAL_COMMA.fullmatch(cell.strip()):
        cell = cell.replace(",", ".")
    return float(cell)


def _number(cell: str, column: str, decimal_comma: bool = False) -> float:
    try:
        value = number(cell, decimal_comma)
    except ValueError:
        raise _BadRowError(f"column {column!r}: not a number: {cell!r}") from None
    if not math.isfinite(value):
        raise _BadRowError(f"column {column!r}: not finite: {cell!r}")
    if abs(value) > MAX_ABS_VALUE:
        raise _BadRowError(f"column {column!r}: {cell} is beyond ±{MAX_ABS_VALUE:g}, which "
                           "the daemon refuses in a reading")
    return value


def _is_text_column(body: list[list[str]], column: int, decimal_comma: bool = False) -> bool:
    """No number among the column's first ``LOOK_ROWS`` filled cells, and at least 3 of
    them (a status or a name, not a reading; a few bad cells are left to the row-by-row
    check, which names each)."""
    cells = [row[column].strip() for row in body[:LOOK_ROWS] if len(row) > column]
    filled = [c for c in cells if c]
    return len(filled) >= 3 and not any(_is_number(c, decimal_comma) for c in filled)


def _is_number(text: str, decimal_comma: bool = False) -> bool:
    try:
        number(text, decimal_comma)
    except ValueError:
        return False
    return True


def is_time_column(name: str, body: Sequence[Sequence[str]], index: int) -> bool:
    """Whether the column ``index`` (named ``name``) of rows ``body`` (the first few are
    looked at) holds times: by its name, an ISO date in its first cell, or epoch seconds
    or milliseconds that never decrease in its first cells."""
    if name.lower() in TIME_COLUMNS:
        return True
    cells = [row[index].strip() for row in body[:LOOK_ROWS] if index < len(row)]
    if not cells:
        return False
    if not _is_number(cells[0]):
        try:
            datetime.fromisoformat(cells[0])
        except ValueError:
            return False
        return True
    return epoch_scale(cells) is not None


def epoch_scale(cells: Sequence[str]) -> float | None:
    """1 if ``cells`` are epoch seconds that never decrease, 1000 if milliseconds, else
    None."""
    try:
        values = [float(c) for c in cells]
    except ValueError:
        return None
    if any(b < a for a, b in itertools.pairwise(values)):
        return None
    for scale, (low, high) in ((1.0, EPOCH_SECONDS), (1000.0, EPOCH_MILLISECONDS)):
        if all(low <= v < high for v in values):
            return scale
    return None


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
