"""``anomalyd evaluate`` on a small labelled synthetic set: it must really detect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.cli import main
from daemon.config import AlertConfig
from daemon.evaluate import ALERT_ROW, ALONE, BASELINE_ROW
from daemon.models import ENSEMBLE, ModelBundle
from tests.conftest_models import NORMAL_READING

FEATURES = ("Flow Rate", "Motor Current", "temperature")
WARMUP = 300


def write_run(path: Path, rows: int, seed: int, fault: tuple[int, int] | None) -> None:
    """One device's run at 1 Hz: noise around a level that differs per run, and a fault
    that shifts flow down by 1.5σ and current up by 1σ (rarely out of range per reading)."""
    rng = np.random.default_rng(seed)
    level = np.array([32.0, 1.0, 70.0]) * rng.uniform(0.9, 1.1, 3)
    sigma = np.array([0.4, 0.05, 0.3])
    x = level + rng.normal(size=(rows, 3)) * sigma
    y = np.zeros(rows, dtype=int)
    if fault is not None:
        a, b = fault
        x[a:b] += np.array([-1.5, 1.0, 0.0]) * sigma
        y[a:b] = 1
    lines = ["datetime;" + ";".join(FEATURES) + ";anomaly;changepoint"]
    for i in range(rows):
        t = f"2020-03-09 10:{i // 60 % 60:02d}:{i % 60:02d}"
        lines.append(f"{t};" + ";".join(f"{v:.5f}" for v in x[i]) + f";{y[i]};0")
    path.write_text("\n".join(lines) + "\n")


def figures(table: str) -> dict[tuple[str, str], dict[str, float | None]]:
    """{(variant, detector): {precision, recall, f1, far, mar, auc}} from the markdown
    table (auc None where the table has no score to rank)."""
    out = {}
    names = ("precision", "recall", "f1", "far", "mar", "auc")
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        is_file_row = cells[1].endswith(".csv") if len(cells) > 1 else False
        if len(cells) == 8 and cells[0] in {"per-device", "global"} and not is_file_row:
            nums = [None if c == "—" else float(c) for c in cells[2:]]
            out[(cells[0], cells[1])] = dict(zip(names, nums, strict=True))
    return out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Run ``anomalyd evaluate`` once (training is the slow part): (table, stderr)."""
    root = tmp_path_factory.mktemp("labelled")
    folder = root / "runs"
    folder.mkdir()
    write_run(folder / "0.csv", 700, seed=10, fault=(450, 600))
    write_run(folder / "1.csv", 500, seed=11, fault=(350, 450))
    free = root / "free.csv"
    write_run(free, 1500, seed=99, fault=None)
    out = root / "evaluation.md"
    mp = pytest.MonkeyPatch()
    errors: list[str] = []
    mp.setattr("daemon.cli._progress", errors.append)
    try:
        code = main(
            [
                "evaluate",
                str(folder),
                "--anomaly-free",
                str(free),
                "--warmup",
                str(WARMUP),
                "--out",
                str(out),
                "--per-file",
                # every detector, LOF too (the default ensemble leaves it out)
                "--detectors",
                "isolation_forest,lof,autoencoder",
            ]
        )
    finally:
        mp.undo()
    assert code == 0
    return out.read_text(), "\n".join(errors)


def test_windowed_detectors_find_a_sustained_shift_with_few_false_alarms(
    evaluated: tuple[str, str],
) -> None:
    table, _ = evaluated
    got = figures(table)
    assert "Scored points: 350 normal, 250 anomalous." in table
    # Measured: ensemble recall 0.44 / FAR 0 % per-device, 0.45 / 2.6 % global. With
    # baselines a reading must also exceed its device's threshold (1.5x the largest
    # deviation of the held-back warm-up), so a 1.5σ shift is found about half the time;
    # the bounds fail if windows, baselines or thresholds stop working.
    per_device, global_ = got[("per-device", "ensemble")], got[("global", "ensemble")]
    assert per_device["recall"] >= 0.35 and per_device["far"] <= 6.0, per_device
    assert global_["recall"] >= 0.35 and global_["far"] <= 6.0, global_
    assert got[("per-device", "lof")]["recall"] >= 0.35, got
    assert got[("per-device", BASELINE_ROW)]["recall"] >= 0.35, got
    assert got[("per-device", ALERT_ROW)]["far"] <= 6.0, got


def test_evaluate_reports_every_detector_and_its_progress(evaluated: tuple[str, str]) -> None:
    table, progress = evaluated
    got = figures(table)
    detectors = {"isolation_forest", "lof", "autoencoder", "ensemble"}
    names = {*detectors, *(d + ALONE for d in detectors), ALERT_ROW, BASELINE_ROW}
    assert {d for v, d in got if v == "per-device"} == names
    assert "[1/2] 0.csv" in progress and "[2/2] 1.csv" in progress
    assert "training once on free.csv" in progress


def test_a_baseline_can_only_veto_a_detectors_verdicts(evaluated: tuple[str, str]) -> None:
    """The daemon flags a reading only if the detector and the baseline both do, so each
    detector alone flags at least as many points, normal and anomalous."""
    got = figures(evaluated[0])
    for variant in ("per-device", "global"):
        for d in ("isolation_forest", "lof", "autoencoder", "ensemble"):
            both, alone = got[(variant, d)], got[(variant, d + ALONE)]
            assert alone["recall"] >= both["recall"] and alone["far"] >= both["far"], (d, got)


def test_each_detector_alone_ranks_faults_above_normal_points(
    evaluated: tuple[str, str],
) -> None:
    """AUC is given for the detectors' own scores only, and it shows real discrimination
    (0.5 is chance). Measured per-device 0.79 (autoencoder) to 0.95 (LOF), ensemble 0.92;
    the global model, trained on another level, ranks far worse (0.39-0.76)."""
    got = figures(evaluated[0])
    for variant in ("per-device", "global"):
        for d in ("isolation_forest", "lof", "autoencoder", "ensemble"):
            auc = got[(variant, d + ALONE)]["auc"]
            assert auc is not None and 0.0 <= auc <= 1.0, (variant, d, got)
            assert got[(variant, d)]["auc"] is None
        assert got[(variant, ALERT_ROW)]["auc"] is None
    assert got[("per-device", "ensemble" + ALONE)]["auc"] >= 0.8, got  # type: ignore[operator]


def test_every_false_alarm_of_the_ensemble_is_attributed_to_an_input(
    evaluated: tuple[str, str],
) -> None:
    """The second table counts the ensemble's false alarms by the input their explanation
    names first: its counts add up to the FAR of the ensemble row, input names are the
    model's (windowed) inputs."""
    table, _ = evaluated
    got = figures(table)
    leads: dict[str, dict[str, int]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        is_leads_row = cells[2].isdigit() and not cells[1].isdigit() if len(cells) == 5 else False
        if is_leads_row and cells[0] in {"per-device", "global"}:
            leads.setdefault(cells[0], {})[cells[1]] = int(cells[2])
    for variant in ("per-device", "global"):
        far = got[(variant, "ensemble")]["far"]
        assert far is not None
        false_alarms = round(far * 350 / 100)  # 350 normal points are scored
        assert sum(leads[variant].values()) == false_alarms, (variant, leads)
        if false_alarms == 0:  # measured: none per-device, 9 global
            assert leads[variant] == {"(no false alarms)": 0}
            continue
        for name in leads[variant]:
            assert name.startswith(FEATURES) and name.endswith("]"), name


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"0.csv": "datetime;x;y\n2020-03-09 10:00:00;1;2\n"}, "no label column (one of anomaly"),
        ({"0.csv": "datetime;x;anomaly\n2020-03-09 10:00:00;1;0\n"},
         "1 rows, not more than the warm-up (300): nothing would be scored"),
        ({"0.csv": "datetime;x;anomaly\n2020-03-09 10:00:00;hot;0\n"},
         "column 'x': not a number: 'hot'"),
    ],
)
def test_a_folder_with_no_usable_file_is_refused_with_each_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert main(["evaluate", str(tmp_path), "--warmup", str(WARMUP)]) == 2
    err = capsys.readouterr().err
    assert "no file could be evaluated" in err and message in err


def test_unusable_files_are_skipped_and_named_the_rest_evaluated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad file costs only itself: files are found in subfolders too (SKAB's layout), an
    unlabelled one and an unreadable one are skipped with their reasons, in the progress
    and under the table, and the labelled run is evaluated."""
    (tmp_path / "valve1").mkdir()
    (tmp_path / "anomaly-free").mkdir()
    write_run(tmp_path / "valve1" / "0.csv", 400, seed=1, fault=(350, 380))
    (tmp_path / "valve1" / "1.csv").write_text(
        "datetime;x;anomaly\n2020-03-09 10:00:00;;0\n2020-03-09 10:00:01;y;0\n")
    (tmp_path / "anomaly-free" / "free.csv").write_text("datetime;x\n2020-03-09 10:00:00;1\n")
    out = tmp_path / "table.md"
    assert main(["evaluate", str(tmp_path), "--warmup", str(WARMUP), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    table = out.read_text()
    unreadable = "2 of 2 rows cannot be used: line 2: column 'x': not a number: ''"
    for name, why in (("anomaly-free/free.csv", "no label column"),
                      ("valve1/1.csv", unreadable)):
        assert f"skipped {name}: {why}" in err
        assert f"Skipped {name}: {why}" in table
    assert "[1/1] valve1/0.csv: training on 300 rows" in err
    assert "Scored points: 70 normal, 30 anomalous." in table


def test_skip_bad_rows_evaluates_a_file_with_gaps_and_says_how_many_rows_went(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path / "0.csv", 400, seed=1, fault=(350, 380))
    lines = (tmp_path / "0.csv").read_text().splitlines()
    for i in (10, 360):  # a dropout during the warm-up and one in the fault
        cells = lines[i].split(";")
        cells[2] = ""
        lines[i] = ";".join(cells)
    (tmp_path / "0.csv").write_text("\n".join(lines) + "\n")
    args = ["evaluate", str(tmp_path), "--warmup", str(WARMUP)]
    assert main(args) == 2
    assert "2 of 400 rows cannot be used: line 11: column 'Motor Current'" in (
        capsys.readouterr().err
    )
    assert main([*args, "--skip-bad-rows"]) == 0
    out, err = capsys.readouterr()
    assert "0.csv: left out 2 bad rows: line 11: column 'Motor Current': not a number" in err
    assert "Rows of 0.csv left out as not all numbers: 2." in out
    # 398 rows: the warm-up now ends at the original row 300, and one fault row is gone
    assert "Scored points: 69 normal, 29 anomalous." in out


def test_the_global_variant_leaves_out_a_file_of_another_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path / "0.csv", 400, seed=1, fault=(350, 380))
    other = (tmp_path / "0.csv").read_text().replace("Motor Current", "Motor Amps", 1)
    (tmp_path / "1.csv").write_text(other)
    free = tmp_path / "free.csv.txt"  # not a .csv: not one of the labelled files
    write_run(free, 400, seed=2, fault=None)
    code = main(["evaluate", str(tmp_path), "--anomaly-free", str(free),
                 "--warmup", str(WARMUP), "--per-file"])
    assert code == 0
    out, err = capsys.readouterr()
    why = "global variant only: features ['Flow Rate', 'Motor Amps', 'temperature'] differ"
    assert f"skipped 1.csv in the {why} from 0.csv's" in err
    assert f"Skipped 1.csv: {why}" in out
    files = [line.split("|")[1:3] for line in out.splitlines() if ".csv |" in line]
    assert [(v.strip(), f.strip()) for v, f in files] == [
        ("per-device", "0.csv"), ("per-device", "1.csv"), ("global", "0.csv")
    ]


def test_labelled_files_are_found_in_subfolders_in_natural_order(tmp_path: Path) -> None:
    from daemon.training.datasets import csv_files

    for rel in ("valve2/10.csv", "valve2/2.csv", "valve10/1.csv", "other/b.CSV", "1.csv",
                "notes.txt", "valve2/sub/0.csv", ".hidden/2.csv",
                "valve2/.ipynb_checkpoints/2-checkpoint.csv"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    got = [p.relative_to(tmp_path).as_posix() for p in csv_files(tmp_path)]
    assert got == ["1.csv", "other/b.CSV", "valve2/2.csv", "valve2/10.csv", "valve2/sub/0.csv",
                   "valve10/1.csv"]


def test_per_file_rows_add_up_to_the_pooled_ensemble_row(evaluated: tuple[str, str]) -> None:
    table, _ = evaluated
    got = figures(table)
    rows: dict[str, list[list[str]]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[1].endswith(".csv"):
            rows.setdefault(cells[0], []).append(cells)
    for variant in ("per-device", "global"):
        assert [r[1] for r in rows[variant]] == ["0.csv", "1.csv"]
        assert sum(int(r[2]) for r in rows[variant]) == 350  # normal points
        assert sum(int(r[3]) for r in rows[variant]) == 250  # anomalous points
        far = got[(variant, "ensemble")]["far"]
        assert far is not None
        assert sum(int(r[7]) for r in rows[variant]) == round(far * 350 / 100)


def test_roc_auc_agrees_with_scikit_learn_ties_included() -> None:
    from sklearn.metrics import roc_auc_score

    from daemon.eval_report import roc_auc

    rng = np.random.default_rng(3)
    y = rng.random(500) < 0.3
    scores = np.round(rng.normal(size=500) + 0.8 * y, 1)  # rounded: many ties
    got = roc_auc(scores, y)
    assert got is not None and abs(got - roc_auc_score(y, scores)) < 1e-12
    assert roc_auc(scores, np.zeros(500, dtype=bool)) is None  # one class: undefined


def test_fault_events_are_runs_of_labelled_points_caught_by_any_flag() -> None:
    from daemon.eval_report import Events, runs

    y = np.array([0, 1, 1, 0, 1, 0, 1, 1, 1], dtype=bool)
    flags = np.array([1, 0, 1, 0, 0, 0, 0, 0, 1], dtype=bool)
    assert runs(y) == [(1, 3), (4, 5), (6, 9)]
    e = Events.of([flags, flags[:3]], [y, y[:3]])
    # file 1: caught after 1 reading, missed, caught after 2; file 2: (1, 3) caught after 1
    assert e.events == 4 and e.delays == (1, 2, 1)
    assert runs(np.zeros(4, dtype=bool)) == [] and runs(np.ones(3, dtype=bool)) == [(0, 3)]


def test_the_events_table_agrees_with_the_per_file_figures(evaluated: tuple[str, str]) -> None:
    """One labelled fault per file: its event is caught exactly where the ensemble's
    per-file MAR is below 100 %."""
    table, _ = evaluated
    events: dict[tuple[str, str], list[str]] = {}
    per_file_mar: dict[str, list[float]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] in {"per-device", "global"} and cells[2].isdigit():
            events[(cells[0], cells[1])] = cells[2:]
        if len(cells) == 9 and cells[1].endswith(".csv"):
            per_file_mar.setdefault(cells[0], []).append(float(cells[6]))
    for variant in ("per-device", "global"):
        n, caught, median, longest = events[(variant, "ensemble")]
        assert int(n) == 2
        assert int(caught) == sum(1 for mar in per_file_mar[variant] if mar < 100.0)
        if int(caught):
            assert 0 <= float(median) <= int(longest)
        assert int(events[(variant, ALERT_ROW)][0]) == 2


def test_pages_are_raises_of_the_alert_split_by_where_they_happen() -> None:
    from daemon.eval_report import Pages

    y = np.array([0, 0, 1, 1, 1, 1, 0, 0, 1, 1], dtype=bool)
    # raised at 1 (normal), resolved, raised at 3 (fault 1), resolved, raised at 5 (fault 1
    # again), raised at 8 (fault 2)
    active = np.array([0, 1, 0, 1, 0, 1, 0, 0, 1, 1], dtype=bool)
    # a second file whose alert is already active at its first scored point
    p = Pages.of([active, np.ones(3, dtype=bool)], [y, np.zeros(3, dtype=bool)])
    assert (p.raised, p.at_fault, p.false, p.faults_paged_again) == (5, 3, 2, 1)
    assert Pages.of([np.zeros(4, dtype=bool)], [y[:4]]) == Pages(0, 0, 0, 0)


def test_the_pages_table_counts_the_alert_rows_raises(evaluated: tuple[str, str]) -> None:
    """Each file's fault is caught by the alert (recall of the alert row above 0), so at
    least one page per variant is raised at a fault; the split adds up."""
    table, _ = evaluated
    pages = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in {"per-device", "global"} and cells[1].isdigit():
            pages[cells[0]] = [int(c) for c in cells[1:]]
    rows = figures(table)
    assert set(pages) == {"per-device", "global"}
    for variant, (raised, at_fault, false, again) in pages.items():
        assert raised == at_fault + false and 0 <= again <= 2
        recall = rows[(variant, ALERT_ROW)]["recall"]
        assert recall is not None and (at_fault >= 1) == (recall > 0)


def test_a_run_reports_the_largest_drift_its_baseline_absorbed(model_bundle: ModelBundle) -> None:
    """The temperature sinks by 3σ over 700 readings and comes back over 500: the baseline
    follows it (nothing flagged), and the run reports the deepest point it followed, not
    where it ended."""
    from daemon.evaluate import stream

    b = model_bundle
    level = np.array([NORMAL_READING[f] for f in b.features])
    n, t = 1400, b.features.index("temperature")
    x = level + np.random.default_rng(1).normal(size=(n, len(level))) * level * 0.01
    ramp = np.zeros(n)
    ramp[200:900] = -np.linspace(0.0, 3.0, 700)
    ramp[900:] = np.linspace(-3.0, 0.0, 500)
    x[:, t] += ramp * level[t] * 0.01
    run = stream(b, x, ENSEMBLE, warmup=200, alerts=AlertConfig())
    assert not run.flags[200:].any()
    assert run.drift is not None
    name, spreads = run.drift
    # the centre trails the ramp by its ~100-reading lag: 3σ less ~0.4σ at the bottom
    assert name == "temperature" and -3.0 < spreads < -2.0
    assert stream(b, x, ENSEMBLE, warmup=0, alerts=AlertConfig()).drift is None  # no baseline


def test_a_configuration_announcing_presence_streams_as_one_without(
    model_bundle: ModelBundle,
) -> None:
    """With ``alerts.quiet_after_s`` set (as in the daemon's configuration, which
    ``evaluate`` reads), a device's first reading also announces its presence: that is no
    rejection (``evaluate`` stopped with ``KeyError: 'detail'`` on it)."""
    from daemon.evaluate import stream

    level = np.array([NORMAL_READING[f] for f in model_bundle.features])
    x = level + np.random.default_rng(2).normal(size=(60, len(level))) * level * 0.01
    quiet = stream(model_bundle, x, ENSEMBLE, warmup=0, alerts=AlertConfig(quiet_after_s=300))
    plain = stream(model_bundle, x, ENSEMBLE, warmup=0, alerts=AlertConfig())
    assert (quiet.flags == plain.flags).all() and (quiet.scores == plain.scores).all()


def _per_file_rows(table: str) -> dict[tuple[str, str], list[str]]:
    """{(variant, run): the per-file table's figures} from ``--per-file`` output."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and ".csv" in cells[1]:
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_a_file_with_a_device_column_is_one_run_per_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plant export interleaves its devices' rows: each device is windowed, warmed up
    and scored on its own, with the figures of the same runs given one file each. Before,
    the file was one run, every window mixing both pumps."""
    write_run(tmp_path / "0.csv", 500, seed=10, fault=(420, 480))
    write_run(tmp_path / "1.csv", 450, seed=11, fault=(380, 420))
    runs = [(p, (tmp_path / f"{p}.csv").read_text().splitlines()) for p in ("0", "1")]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    lines = [runs[0][1][0] + ";device"]
    for i in range(1, 501):
        lines += [f"{rows[i]};pump-{p}" for p, rows in runs if i < len(rows)]
    (mixed / "export.csv").write_text("\n".join(lines) + "\n")
    args = ["--warmup", str(WARMUP), "--per-file", "--detectors", "isolation_forest"]
    assert main(["evaluate", str(tmp_path), *args]) == 0
    separate = _per_file_rows(capsys.readouterr().out)
    assert main(["evaluate", str(mixed), *args]) == 0
    out, err = capsys.readouterr()
    assert "export.csv: 2 devices, each evaluated as its own run" in err
    together = _per_file_rows(out)
    assert together == {
        ("per-device", "export.csv [pump-0]"): separate[("per-device", "0.csv")],
        ("per-device", "export.csv [pump-1]"): separate[("per-device", "1.csv")],
    }


def _model_set_on_a_normal_run(tmp_path: Path) -> tuple[Path, Path]:
    """(an anomaly-free run, a model set trained on it with --window 10)."""
    free = tmp_path / "free.csv"
    write_run(free, 1000, seed=99, fault=None)
    models = tmp_path / "models"
    assert main(["train", "--data", str(free), "--out", str(models), "--window", "10",
                 "--detectors", "isolation_forest"]) == 0
    return free, models


def test_a_trained_model_set_is_evaluated_as_the_daemon_would_serve_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--models``: the runs streamed through a model set trained beforehand (here on the
    anomaly-free file, as the global variant trains its own: the same figures); a run
    without one of its features is left out of that variant only."""
    runs = tmp_path / "runs"
    runs.mkdir()
    write_run(runs / "0.csv", 500, seed=10, fault=(420, 480))
    other = (runs / "0.csv").read_text().replace("Motor Current", "Motor Amps", 1)
    (runs / "1.csv").write_text(other)
    free, models = _model_set_on_a_normal_run(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", str(runs), "--anomaly-free", str(free), "--models", str(models),
                 "--warmup", str(WARMUP), "--per-file",
                 "--detectors", "isolation_forest"]) == 0
    out, err = capsys.readouterr()
    rows = _per_file_rows(out)
    variant = next(v for v, _ in rows if v.startswith("models "))
    assert rows[(variant, "0.csv")] == rows[("global", "0.csv")]
    assert (variant, "1.csv") not in rows and ("per-device", "1.csv") in rows
    why = f"{variant} only: no column for its feature(s) ['Motor Current']"
    assert f"skipped 1.csv in the {why}" in err


def test_a_model_set_no_run_can_feed_is_left_out_of_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every run lacks one of the model set's features: no ``models`` row (it showed as a
    row of zeros with no false alarms, a clean result to the eye)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    write_run(runs / "0.csv", 400, seed=1, fault=(350, 380))
    free = tmp_path / "free.csv"
    write_run(free, 600, seed=2, fault=None)
    (tmp_path / "other.csv").write_text(free.read_text().replace("Motor Current", "Amps", 1))
    assert main(["train", "--data", str(tmp_path / "other.csv"), "--out", str(tmp_path / "m"),
                 "--detectors", "isolation_forest"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(runs), "--models", str(tmp_path / "m"), "--warmup",
                 str(WARMUP), "--detectors", "isolation_forest"]) == 0
    out, err = capsys.readouterr()
    assert "| models " not in out and "| per-device |" in out
    assert "no run has the model set's features" in err
    # without the per-device variant there is nothing left to evaluate: said, exit 2
    assert main(["evaluate", str(runs), "--no-per-device", "--warmup", str(WARMUP)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_the_per_device_variant_can_be_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    write_run(runs / "0.csv", 400, seed=1, fault=(350, 380))
    free = tmp_path / "free.csv"
    write_run(free, 600, seed=2, fault=None)
    assert main(["evaluate", str(runs), "--anomaly-free", str(free), "--no-per-device",
                 "--warmup", str(WARMUP), "--detectors", "isolation_forest"]) == 0
    out, err = capsys.readouterr()
    assert "| global |" in out and "| per-device |" not in out
    assert "per-device [" not in err  # nothing trained per run


def _rows_of(table: str, variant_start: str) -> dict[str, list[str]]:
    """{detector row: figures} of the main table's variant whose name starts so."""
    rows = {}
    for line in table.split("\n\n")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith(variant_start):
            rows[cells[1]] = cells[2:]
    return rows


def test_the_model_set_variant_says_its_warm_up_and_follows_the_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ``models`` variant is "streamed as the daemon would serve it", yet its device
    baselines warmed up over --warmup (400, SKAB's protocol) where the daemon's
    baseline.warmup_readings is 0 by default. Without --warmup it now follows the
    configuration, and every row names the warm-up used; the rows counted stay those after
    the protocol's warm-up (400), as in the other variants; --warmup given is both."""
    runs = tmp_path / "runs"
    runs.mkdir()
    write_run(runs / "0.csv", 700, seed=10, fault=(450, 600))
    _, models = _model_set_on_a_normal_run(tmp_path)
    capsys.readouterr()
    common = ["evaluate", str(runs), "--models", str(models), "--no-per-device",
              "--detectors", "isolation_forest"]
    assert main(common) == 0  # config/anomalyd.toml: warmup_readings = 0
    out, err = capsys.readouterr()
    served = _rows_of(out, "models ")
    assert served and all(", warm-up 0 |" in line for line in out.splitlines()
                          if line.startswith("| models "))
    assert "warms up its baseline over its first 0 readings (0: no baseline)" in err
    assert "its figures count the rows after the first 400" in err
    # no baseline: the detector as served is the detector alone (but for its AUC)
    assert served["isolation_forest"][:-1] == served["isolation_forest, no baseline"][:-1]
    config = tmp_path / "anomalyd.toml"
    config.write_text("[baseline]\nwarmup_readings = 350\n")
    assert main(["--config", str(config), *common]) == 0
    out350, _ = capsys.readouterr()
    assert "| models " in out350 and ", warm-up 350 |" in out350
    assert main([*common, "--warmup", "320"]) == 0  # given: the protocol's and the variant's
    out_given, err_given = capsys.readouterr()
    assert ", warm-up 320 |" in out_given and "rows after the first 320" in err_given
