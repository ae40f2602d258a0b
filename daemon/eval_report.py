"""What ``anomalyd evaluate`` measured, and its markdown report.

The figures of one row (precision, recall, F1, FAR, MAR over pooled points, and the median
per-file ROC AUC of the detector's own score), the whole evaluation (every variant and
row, the false alarms by leading input, the ensemble per file) and the tables that
``anomalyd evaluate`` prints and writes. Pure: arrays in, numbers and text out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Figures:
    precision: float
    recall: float
    f1: float
    far: float  # % of normal points flagged
    mar: float  # % of anomalous points missed
    n_normal: int
    n_anomalous: int
    #: Median over files of the ROC AUC of the detector's own score (threshold-free: how
    #: well it ranks anomalous points above normal ones); None where there is no score.
    auc: float | None = None

    @classmethod
    def of(
        cls, flagged: NDArray[np.bool_], y: NDArray[np.bool_], aucs: Sequence[float] = ()
    ) -> Figures:
        tp = int(np.sum(flagged & y))
        fp = int(np.sum(flagged & ~y))
        fn = int(np.sum(~flagged & y))
        n_anom, n_norm = int(y.sum()), int((~y).sum())
        return cls(
            precision=tp / (tp + fp) if tp + fp else 0.0,
            recall=tp / n_anom if n_anom else 0.0,
            f1=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            far=100.0 * fp / n_norm if n_norm else 0.0,
            mar=100.0 * fn / n_anom if n_anom else 0.0,
            n_normal=n_norm,
            n_anomalous=n_anom,
            auc=float(np.median(aucs)) if len(aucs) else None,
        )


def roc_auc(scores: NDArray[np.float64], y: NDArray[np.bool_]) -> float | None:
    """Probability that a random anomalous point scores above a random normal one (ties
    count half); None unless both classes are present."""
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return None
    from scipy.stats import rankdata  # scipy comes with scikit-learn (training extra)

    ranks = rankdata(scores)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class Events:
    """Labelled fault events (each run of consecutive anomalous points in a file) and how
    a row caught them: an event is caught if any of its points is flagged, after a delay
    of the readings from its first point to the first flagged one."""

    events: int
    delays: tuple[int, ...]  # one per caught event

    @classmethod
    def of(cls, flags: Sequence[NDArray[np.bool_]], ys: Sequence[NDArray[np.bool_]]) -> Events:
        n, delays = 0, []
        for f, y in zip(flags, ys, strict=True):
            for start, end in runs(y):
                n += 1
                hit = np.flatnonzero(f[start:end])
                if hit.size:
                    delays.append(int(hit[0]))
        return cls(n, tuple(delays))


@dataclass(frozen=True)
class Pages:
    """The alerts an operator is paged for: each raise of a device's alert (a rising edge
    of its active state over the scored points; one already active at the first scored
    point counts as raised there), where it was raised, and the faults it flapped on."""

    raised: int
    at_fault: int  # raised at a labelled anomalous point
    false: int  # raised at a normal point
    faults_paged_again: int  # fault events during which it was raised more than once

    @classmethod
    def of(cls, active: Sequence[NDArray[np.bool_]], ys: Sequence[NDArray[np.bool_]]) -> Pages:
        raised = at_fault = again = 0
        for a, y in zip(active, ys, strict=True):
            rises = np.flatnonzero(np.diff(np.concatenate([[0], a.astype(np.int8)])) == 1)
            raised += rises.size
            at_fault += int(y[rises].sum())
            again += sum(
                1 for start, end in runs(y) if np.sum((rises >= start) & (rises < end)) > 1
            )
        return cls(raised, at_fault, raised - at_fault, again)


def runs(y: NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(start, end) of each run of True in ``y``, end exclusive."""
    edges = np.diff(np.concatenate([[0], y.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(),
                    strict=True))


@dataclass
class Evaluation:
    """{variant: {row name: figures}}, and for each variant the inputs that the ensemble's
    false alarms name first: {variant: {input: (false alarms, files)}}."""

    figures: dict[str, dict[str, Figures]]
    false_alarm_leads: dict[str, dict[str, tuple[int, int]]]
    #: {variant: [(file name, the ensemble's figures on that file alone)]}
    per_file: dict[str, list[tuple[str, Figures]]] = field(default_factory=dict)
    #: {variant: {row name: fault events caught}} for the ensemble's rows
    events: dict[str, dict[str, Events]] = field(default_factory=dict)
    #: (file, why it was left out): of every variant, or of the global one if it says so
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: (file, how many of its rows were left out as not numbers) with ``--skip-bad-rows``
    rows_left_out: list[tuple[str, int]] = field(default_factory=list)
    #: {variant: the ensemble alert's raises}
    pages: dict[str, Pages] = field(default_factory=dict)
    #: {variant: {file: the largest drift of its baseline: (input, spreads), or None}}
    drift: dict[str, dict[str, tuple[str, float] | None]] = field(default_factory=dict)


def markdown(results: Evaluation, per_file: bool = False) -> str:
    lines = [
        "| variant | detector | precision | recall | F1 | FAR % | MAR % | AUC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, rows in results.figures.items():
        for name, f in rows.items():
            lines.append(
                f"| {variant} | {name} | {f.precision:.2f} | {f.recall:.2f} | {f.f1:.2f} "
                f"| {f.far:.2f} | {f.mar:.2f} | {'—' if f.auc is None else f'{f.auc:.2f}'} |"
            )
    any_rows = next(iter(results.figures.values()))
    f = next(iter(any_rows.values()))
    lines.append("")
    lines.append(f"Scored points: {f.n_normal} normal, {f.n_anomalous} anomalous.")
    lines.append("AUC: the median over files of the ROC AUC of the detector's own score "
                 "(threshold-free; 0.5 is chance).")
    for name, why in results.skipped:
        lines.append(f"Skipped {name}: {why}.")
    for name, n in results.rows_left_out:
        lines.append(f"Rows of {name} left out as not all numbers: {n}.")
    lines += [
        "",
        "The ensemble's false alarms by the input their explanation names first:",
        "",
        "| variant | leading input | false alarms | share | files |",
        "|---|---|---|---|---|",
    ]
    for variant, leads in results.false_alarm_leads.items():
        total = sum(n for n, _ in leads.values())
        for name, (n, files) in leads.items():
            lines.append(f"| {variant} | {name} | {n} | {100.0 * n / total:.0f} % | {files} |")
        if not leads:
            lines.append(f"| {variant} | (no false alarms) | 0 | | |")
    lines += [
        "",
        "Fault events (runs of labelled anomalous points): caught if any of their points is "
        "flagged; delay in readings from an event's first point to its first flag:",
        "",
        "| variant | row | events | caught | median delay | longest delay |",
        "|---|---|---|---|---|---|",
    ]
    for variant, rows_events in results.events.items():
        for name, e in rows_events.items():
            median = f"{np.median(e.delays):.0f}" if e.delays else "—"
            longest = str(max(e.delays)) if e.delays else "—"
            lines.append(f"| {variant} | {name} | {e.events} | {len(e.delays)} | {median} "
                         f"| {longest} |")
    if results.pages:
        lines += [
            "",
            "Pages (each raise of a device's ensemble alert): where they were raised, and "
            "the fault events raised more than once (an alert that resolved and came back "
            "during one fault):",
            "",
            "| variant | raised | at a fault | at a normal point | faults paged more than once |",
            "|---|---|---|---|---|",
        ]
        for variant, p in results.pages.items():
            lines.append(f"| {variant} | {p.raised} | {p.at_fault} | {p.false} "
                         f"| {p.faults_paged_again} |")
    if per_file:
        lines += [
            "",
            "The ensemble on each file alone; largest drift: how far the device baseline's "
            "adapting centre moved from its warm-up fit, judged as a reading is (the input "
            "farthest from what the others predict, in conditional spreads), looked at every "
            "256 readings (`baseline.drift_warn_spreads`):",
            "",
            "| variant | file | normal | anomalous | F1 | FAR % | MAR % | false alarms "
            "| largest drift |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, each in results.per_file.items():
            drifts = results.drift.get(variant, {})
            for name, f in each:
                false_alarms = round(f.far * f.n_normal / 100)
                moved = drifts.get(name)
                drift = "—" if moved is None else f"{moved[1]:+.1f} {moved[0]}"
                lines.append(
                    f"| {variant} | {name} | {f.n_normal} | {f.n_anomalous} | {f.f1:.2f} "
                    f"| {f.far:.2f} | {f.mar:.2f} | {false_alarms} | {drift} |"
                )
    return "\n".join(lines) + "\n"
