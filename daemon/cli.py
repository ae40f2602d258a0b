"""Command line: ``anomalyd run | train | record | simulate | score | evaluate | watch |
devices | rewarm | silence | ack | forget | reload | check-config``: the arguments, and the commands
that run here; those that talk to a running daemon are ``daemon.device_client``'s. Exit
codes: ``daemon.exit_codes``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson

from daemon import __version__
from daemon.config import UNREAD_NOTE, Settings, load_settings, unread_variables
from daemon.errors import (
    AnomalydError,
    BrokerError,
    BrokerRefusedError,
    ConfigError,
    ModelAccessError,
    ModelLoadError,
    TrainingError,
)
from daemon.exit_codes import EXIT_BROKER, EXIT_FAILURE, EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from daemon.training import MIN_ROWS, QUANTILE_RANGE

#: The SKAB protocol's rows per run that train and warm up the device (evaluate --warmup).
SKAB_WARMUP = 400
DEVICE_COLUMN_HELP = ("the CSV column naming each row's device, where it is not called "
                      "device_id, device, asset or asset_id: each device is windowed on its own")


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _names(text: str | None) -> list[str] | None:
    """A comma-separated option (--features, --detectors) as a list; None when not given."""
    return [name.strip() for name in text.split(",")] if text else None


def _detectors(args: argparse.Namespace) -> list[str] | None:
    """--detectors, checked before any work: ConfigError names what is wrong."""
    from daemon.training.train import member_names

    detectors = _names(args.detectors)
    try:
        member_names(detectors)
    except ValueError as exc:
        raise ConfigError(f"--detectors: {exc}") from exc
    return detectors


def cmd_run(args: argparse.Namespace) -> int:
    from daemon import logs
    from daemon.models import load_bundle
    from daemon.service import Service

    # Until the running service installs its reload handler, a SIGHUP (systemctl reload)
    # would end the process, SIGHUP's default: ignore it while starting, when the model set
    # is being loaded anyway. (Inherited by workers, which install their own handler.)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = _settings(args)
    logs.configure(settings.logging.level, settings.logging.format, worker=args.worker_index)
    unread = unread_variables()
    if unread and args.worker_index is None:  # (the workers inherit the supervisor's)
        import structlog

        structlog.get_logger("anomalyd").warning("environment_not_read", variables=unread,
                                                 note=UNREAD_NOTE)
    bundle = load_bundle(settings.model.dir)
    if settings.service.workers > 1 and args.worker_index is None:
        from daemon.supervisor import run_workers

        return run_workers(settings, args.config)
    return Service(settings, bundle, worker_index=args.worker_index,
                   supervisor_pid=args.supervisor_pid).run()


def _tensorflow_missing(detectors: list[str] | None) -> str | None:
    """Why the autoencoder among ``detectors`` cannot be trained here: TensorFlow is not
    installed (the serving image, a venv without the train extra); else None."""
    import importlib.util

    from daemon.training.train import member_names

    if "autoencoder" not in member_names(detectors) or importlib.util.find_spec("tensorflow"):
        return None
    return ("training the autoencoder needs TensorFlow, which is not installed here (the "
            "serving image has none): install the train extra (pip install "
            "'anomalyd[train]'), train with the Dockerfile's train image, "
            "or leave the autoencoder out (--detectors isolation_forest)")


def cmd_train(args: argparse.Namespace) -> int:
    from daemon.training.train import out_problem, train_csv, train_default

    settings = _settings(args)
    out = Path(args.out) if args.out else settings.model.dir
    problem = out_problem(out, settings.state.dir, force=args.force)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    features = _names(args.features)
    detectors = _detectors(args)
    missing = _tensorflow_missing(detectors)
    if missing:  # before any work (it failed with a traceback once the forest was fitted)
        print(f"error: {missing}", file=sys.stderr)
        return EXIT_USAGE
    print(f"training into {out}", file=sys.stderr)
    if args.data:
        manifest = train_csv(Path(args.data), out, features=features, seed=args.seed,
                             quantile=args.quantile, progress=_progress, window=args.window,
                             detectors=detectors, skip_bad_rows=args.skip_bad_rows,
                             device_column=args.device_column)
    else:
        if features or args.device_column:
            print("error: --features and --device-column apply to --data only",
                  file=sys.stderr)
            return EXIT_USAGE
        manifest = train_default(out, rows=args.rows, seed=args.seed, quantile=args.quantile,
                                 progress=_progress, detectors=detectors)
    print(f"model set {manifest['model_version']} written to {out}", file=sys.stderr)
    labelled = False
    for name, det in manifest["detectors"].items():
        v = det.get("validation") or {}
        # without labelled anomalies only the false-alarm rate on held-back rows means
        # anything (precision and F1 would print as 0: flags, none of them right)
        labelled = bool(v.get("n_anomalous"))
        shown = ("precision", "recall", "f1", "far") if labelled else ("far",)
        figures = " ".join(f"{k}={v[k]:.3f}" for k in shown if isinstance(v.get(k), float))
        print(f"  {name:<17} threshold={det['threshold']:.4g} {figures}", file=sys.stderr)
    if not labelled:
        print("  (no labelled anomalies to validate on: far is the share of held-back normal "
              "rows flagged; an 'anomaly' column of 1 on known faults measures recall)",
              file=sys.stderr)
    return EXIT_OK


def cmd_record(args: argparse.Namespace) -> int:
    from daemon.record import record

    recorded = record(_settings(args), Path(args.out), duration_s=args.duration,
                      max_readings=args.max_readings, devices=_names(args.devices),
                      features=_names(args.features), say=_progress)
    return EXIT_OK if recorded else EXIT_FAILURE


def cmd_simulate(args: argparse.Namespace) -> int:
    from daemon.simulate import simulate

    settings = _settings(args)
    return simulate(settings, devices=args.devices, rate=args.rate, duration=args.duration,
                    fault_rate=args.fault_rate, batch=args.batch, seed=args.seed,
                    qos=args.qos, send_anyway=args.send_anyway)


def cmd_score(args: argparse.Namespace) -> int:
    from daemon.models import load_bundle
    from daemon.offline import check_input, detector_problem, score_file

    settings = _settings(args)
    bundle = load_bundle(settings.model.dir)
    problem = detector_problem(bundle, args.model, settings)
    if problem:  # before --out is opened (and emptied)
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    # the same: a file that is not CSV text, or lacks --device-column, is refused first
    check_input(Path(args.input), args.device_column)
    clash = _output_clash(args.input, args.out, args.alerts)
    if clash:  # opening it would empty a file before it is read or written
        print(f"error: {clash}", file=sys.stderr)
        return EXIT_USAGE
    out = sys.stdout.buffer if args.out == "-" else open(args.out, "wb")  # noqa: SIM115
    alerts = open(args.alerts, "wb") if args.alerts else None  # noqa: SIM115
    try:
        counts = score_file(Path(args.input), out, settings, bundle, device=args.device,
                            detector=args.model, progress=_progress, alerts=alerts,
                            device_column=args.device_column)
        out.flush()
    except BrokenPipeError:
        # stdout closed early (`anomalyd score FILE | head`): stop quietly. What is still
        # buffered for stdout goes to devnull, or its flush at exit would complain too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    finally:
        if out is not sys.stdout.buffer:
            out.close()
        if alerts is not None:
            alerts.close()
    filling = (f" ({counts['filling']} on a partial window, which raise no alert)"
               if counts["filling"] else "")
    print(f"scored {counts['readings']} readings: {counts['anomalies']} anomalies{filling}, "
          f"{counts['rejected']} rejected; alerts (pages): {counts['raised']} raised, "
          f"{counts['escalated']} escalated, {counts['resolved']} resolved"
          + (f", written to {args.alerts}" if args.alerts else ""), file=sys.stderr)
    if not counts["readings"]:
        why = (f"the first refused as {counts.first_rejection}" if counts.first_rejection
               else "it holds no readings")
        print(f"error: no reading of {args.input} could be scored: {why}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _output_clash(source: str, out: str, alerts: str | None) -> str | None:
    """Why ``score``'s outputs cannot be opened for writing as given (each is emptied on
    opening), or None: one of them is the file scored, or both are one file."""
    named = [(flag, path) for flag, path in (("--out", out), ("--alerts", alerts))
             if path and path != "-"]
    for flag, path in named:
        if _same_file(path, source):
            return (f"{flag} {path} is the file being scored: it would be emptied before "
                    "it is read; write to another file")
    if len(named) == 2 and _same_file(named[0][1], named[1][1]):
        return f"--out and --alerts name one file ({out}): give each its own"
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def cmd_evaluate(args: argparse.Namespace) -> int:
    from daemon.eval_report import markdown
    from daemon.evaluate import evaluate
    from daemon.training.datasets import csv_files

    settings = _settings(args)
    folder = Path(args.folder)
    files = csv_files(folder)
    if not files:
        print(f"error: no CSV files in {args.folder} or its subfolders", file=sys.stderr)
        return EXIT_USAGE
    free = Path(args.anomaly_free) if args.anomaly_free else None
    detectors = _detectors(args)
    # the per-device and --anomaly-free variants train model sets (a traceback before)
    missing = _tensorflow_missing(detectors) if free or not args.no_per_device else None
    if missing:
        print(f"error: {missing}; evaluate trains model sets for its per-device and "
              "--anomaly-free variants (--models DIR --no-per-device trains none)",
              file=sys.stderr)
        return EXIT_USAGE
    print(f"evaluating {len(files)} files from {args.folder}", file=sys.stderr)
    # the protocol's warm-up is --warmup; the model set's variant is served as the daemon
    # would serve it (baseline.warmup_readings) unless --warmup says otherwise
    warmup = SKAB_WARMUP if args.warmup is None else args.warmup
    models_warmup = settings.baseline.warmup_readings if args.warmup is None else args.warmup
    results = evaluate(files, anomaly_free=free, warmup=warmup, window=args.window,
                       quantile=args.quantile, alerts=settings.alerts, progress=_progress,
                       detectors=detectors, root=folder, skip_bad_rows=args.skip_bad_rows,
                       threshold_margin=args.threshold_margin or settings.baseline.threshold_margin,
                       models=Path(args.models) if args.models else None,
                       device_column=args.device_column, per_device=not args.no_per_device,
                       models_warmup=models_warmup)
    table = markdown(results, per_file=args.per_file)
    sys.stdout.write(table)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
        print(f"table written to {args.out}", file=sys.stderr)
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    from daemon.watch import watch

    return watch(_settings(args), anomalies_only=args.anomalies)


def cmd_devices(args: argparse.Namespace) -> int:
    from daemon.device_client import show_devices

    if args.id is not None and args.alerts:
        print("error: --alerts lists the devices in alert; it takes no device id",
              file=sys.stderr)
        return EXIT_USAGE
    return show_devices(_settings(args), args.id, as_json=args.json, alerts_only=args.alerts)


def cmd_rewarm(args: argparse.Namespace) -> int:
    from daemon.device_client import rewarm

    return rewarm(_settings(args), args.id)


def cmd_forget(args: argparse.Namespace) -> int:
    from daemon.device_client import forget

    return forget(_settings(args), args.id)


def cmd_silence(args: argparse.Namespace) -> int:
    from daemon.device_client import silence

    return silence(_settings(args), args.id, 0.0 if args.off else args.duration)


def cmd_ack(args: argparse.Namespace) -> int:
    from daemon.device_client import acknowledge

    return acknowledge(_settings(args), args.id, args.by, args.note)


def _user() -> str | None:
    """Who runs the command, for ``ack --by``'s default (None if the system cannot say)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        return None


def _ack_text(name: str) -> Callable[[str], str]:
    """An argparse type: the acknowledgement's field ``name`` ("by" or "note"), checked as
    the daemon checks it (``daemon.control.check_ack_field``)."""

    def check(text: str) -> str:
        from daemon.control import ControlError, check_ack_field

        try:
            check_ack_field(name, text)
        except ControlError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def cmd_reload(args: argparse.Namespace) -> int:
    from daemon.device_client import reload

    return reload(_settings(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    """The effective configuration, and what ``run`` reads of it before connecting: the
    password and token (files), the TLS files, the model set and its default detector. A
    tester found
    check-config saying "valid" for a missing model.dir or token file that run refused."""
    from daemon.models import load_bundle
    from daemon.offline import detector_problem

    settings = _settings(args)
    sys.stdout.buffer.write(orjson.dumps(settings.masked(), option=orjson.OPT_INDENT_2) + b"\n")
    unread = unread_variables()
    if unread:
        print(f"note: {', '.join(unread)} {'is' if len(unread) == 1 else 'are'} "
              f"{UNREAD_NOTE}", file=sys.stderr)
    settings.mqtt.secret()
    settings.http.secret()
    if settings.mqtt.tls.enabled:  # the CA, certificate and key files, read as run reads them
        from daemon.tls import client_context

        client_context(settings.mqtt.tls)
    bundle = load_bundle(settings.model.dir)
    problem = detector_problem(bundle, None, settings)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    print(f"configuration is valid; model set {bundle.version} in {settings.model.dir} loads "
          f"({', '.join(bundle.detector_names)})", file=sys.stderr)
    return EXIT_OK


def _duration(text: str) -> float:
    """An argparse type: a silence's length (``daemon.device_client.parse_duration``)."""
    from daemon.device_client import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _quantile(text: str) -> float:
    """An argparse type: a threshold quantile in ``QUANTILE_RANGE``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    low, high = QUANTILE_RANGE
    if not low <= value < high:
        raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}), got {value}")
    return value


def _margin(text: str) -> float:
    """An argparse type: a baseline threshold margin, checked as the configuration's is."""
    from daemon.config import BaselineConfig

    try:
        return BaselineConfig(threshold_margin=float(text)).threshold_margin
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number from 1 to 100, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anomalyd",
        description="Real-time anomaly detection for industrial sensor streams over MQTT.")
    p.add_argument("--version", action="version", version=f"anomalyd {__version__}")
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="configuration file (default: config/anomalyd.toml if present)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train the preprocessor, the detectors and the ensemble")
    train.add_argument("--data", help="CSV of normal operation, or a folder of them, one per "
                                      "device (default: synthetic pump data)")
    train.add_argument("--features", help="comma-separated feature columns (default: every "
                                          "column but the time and label columns)")
    train.add_argument("--out", help="model directory (default: model.dir / MODEL_DIR)")
    train.add_argument("--rows", type=_at_least(MIN_ROWS), default=20000,
                       help="synthetic rows (default 20000)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--quantile", type=_quantile, default=0.99,
                       help="threshold quantile of held-back normal scores (default 0.99)")
    train.add_argument("--force", action="store_true", help="replace an existing model set")
    train.add_argument("--detectors",
                       help="comma-separated members to fit and fuse, of isolation_forest, "
                            "lof, autoencoder (default: isolation_forest,autoencoder; lof "
                            "adds a neighbour search that doubles the scoring time)")
    train.add_argument("--window", type=_at_least(1), default=1,
                       help="with --data: model inputs are the mean and std of each device's "
                            "last N readings (default 1: raw readings)")
    train.add_argument("--skip-bad-rows", action="store_true",
                       help="with --data: leave out rows with an empty, non-numeric or "
                            "non-finite cell (counted and named) instead of refusing the file")
    train.add_argument("--device-column", help=DEVICE_COLUMN_HELP)
    train.set_defaults(func=cmd_train)

    rec = sub.add_parser(
        "record", help="collect the devices' readings from the broker into one CSV per "
                       "device, to train on (anomalyd train --data OUT)")
    rec.add_argument("out", help="folder for the CSV files (created; an existing device's "
                                 "file with the same columns is appended to)")
    rec.add_argument("--duration", type=_duration,
                     help="how long: 90s, 30m, 2h, 1d (at most 7 days; default: until Ctrl-C)")
    rec.add_argument("--max-readings", type=_at_least(1),
                     help="stop once this many readings are recorded")
    rec.add_argument("--devices", help="comma-separated device ids (default: every device)")
    rec.add_argument("--features", help="comma-separated fields to record (default: the "
                                        "numeric fields of the first reading)")
    rec.set_defaults(func=cmd_record)

    sim = sub.add_parser("simulate", help="publish realistic pump readings with injected faults")
    sim.add_argument("--devices", type=int, default=5)
    sim.add_argument("--rate", type=float, default=1.0, help="readings per second per device")
    sim.add_argument("--duration", type=_duration, default=0,
                     help="how long: 90s, 30m, 2h (default: until interrupted)")
    sim.add_argument("--fault-rate", type=float, default=0.02,
                     help="chance per reading that a fault episode starts (default 0.02)")
    sim.add_argument("--batch", type=int, default=0,
                     help="send batch messages of this many readings (default 0: single)")
    sim.add_argument("--qos", type=int, choices=(0, 1), default=1)
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument("--send-anyway", action="store_true",
                     help="send even when the model set in model.dir reads other features "
                          "than the simulated pumps' (its daemon dead-letters them all)")
    sim.set_defaults(func=cmd_simulate)

    score = sub.add_parser("score", help="score a CSV or JSON-lines file offline (backtesting)")
    score.add_argument("input", help="CSV with a header, JSON lines of reading payloads, or "
                       "a mosquitto_sub -v capture (topic, then payload, per line)")
    score.add_argument("--out", default="-", help="output JSON lines: the verdicts and dead "
                       "letters (default: stdout)")
    score.add_argument("--alerts", help="also write the alert messages (raised, escalated, "
                       "resolved) the daemon would publish to this JSON-lines file")
    score.add_argument("--device",
                       help="device id for rows that do not name one (default: offline, "
                            "with a warning for JSON lines)")
    score.add_argument("--model", default=None, help="detector (default: the configured one)")
    score.add_argument("--device-column", help=DEVICE_COLUMN_HELP)
    score.set_defaults(func=cmd_score)

    ev = sub.add_parser(
        "evaluate", help="SKAB protocol on a folder of labelled CSV files",
        description="Precision, recall, F1, FAR, fault events and pages on labelled runs. "
        "Per-device (always): a model set trained on each run's first --warmup rows. "
        "--anomaly-free: one set trained on that file, for every run. --models: the model "
        "set you trained (the one the daemon would serve), for every run.")
    ev.add_argument("folder", help="folder of labelled CSVs (an 'anomaly' column; one run "
                    "per file, or per device where a file has a device column), subfolders "
                    "included")
    ev.add_argument("--anomaly-free", help="also train once on this normal CSV and score all")
    ev.add_argument("--models", help="also score every run with this trained model set "
                    "(e.g. your model.dir)")
    ev.add_argument("--device-column", help=DEVICE_COLUMN_HELP)
    ev.add_argument("--no-per-device", action="store_true",
                    help="leave out the per-device variant (a model set trained on each "
                         "run's first rows: slow for many runs); with --models or "
                         "--anomaly-free")
    ev.add_argument("--warmup", type=_at_least(MIN_ROWS),
                    help=f"rows per run that train and warm up the device, not counted in "
                         f"the figures (default {SKAB_WARMUP}, SKAB's protocol); the --models "
                         "variant's device baselines warm up over the configuration's "
                         "baseline.warmup_readings unless --warmup is given")
    ev.add_argument("--window", type=_at_least(1), default=10,
                    help="feature window (default 10)")
    ev.add_argument("--quantile", type=_quantile, default=0.99,
                    help="threshold quantile of held-back normal scores (default 0.99)")
    ev.add_argument("--threshold-margin", type=_margin,
                    help="the device baselines' threshold margin (default: the "
                         "configuration's baseline.threshold_margin, 1.5): higher gives fewer "
                         "false alarms and more misses")
    ev.add_argument("--out", help="also write the markdown table to this file")
    ev.add_argument("--per-file", action="store_true",
                    help="also a table of the ensemble's figures on each file alone")
    ev.add_argument("--skip-bad-rows", action="store_true",
                    help="leave out rows with an empty, non-numeric or non-finite cell "
                         "(counted) instead of skipping their file")
    ev.add_argument("--detectors",
                    help="the ensemble's members, as for train (default: train's default)")
    ev.set_defaults(func=cmd_evaluate)

    w = sub.add_parser("watch", help="print verdicts, alerts, dead letters and devices gone "
                                     "quiet as they arrive")
    w.add_argument("--anomalies", action="store_true", help="hide normal verdicts")
    w.set_defaults(func=cmd_watch)

    dev = sub.add_parser("devices", help="show the running daemon's devices (warm-up, alert)")
    dev.add_argument("id", nargs="?", help="one device, in full (JSON)")
    dev.add_argument("--json", action="store_true", help="print the list as JSON")
    dev.add_argument("--alerts", action="store_true",
                     help="only the devices whose alert is active (raised, escalated or "
                          "acknowledged)")
    dev.set_defaults(func=cmd_devices)

    rewarm = sub.add_parser("rewarm", help="make a device of the running daemon warm up again")
    rewarm.add_argument("id", help="the device id")
    rewarm.set_defaults(func=cmd_rewarm)

    forget = sub.add_parser(
        "forget", help="forget a device taken out of service: its state, and its retained "
                       "alert and presence at the broker")
    forget.add_argument("id", help="the device id")
    forget.set_defaults(func=cmd_forget)

    silence = sub.add_parser(
        "silence", help="stop a device's verdicts from raising or resolving alerts for a "
                        "while (maintenance); they are still published")
    silence.add_argument("id", help="the device id")
    how = silence.add_mutually_exclusive_group(required=True)
    how.add_argument("--for", dest="duration", type=_duration,
                     help="how long: 90s, 30m, 2h, 1d (at most 7 days)")
    how.add_argument("--off", action="store_true", help="lift the device's silence now")
    silence.set_defaults(func=cmd_silence)

    ack = sub.add_parser(
        "ack", help="acknowledge a device's active alert (someone is on it): published with "
                    "the alert; it still escalates and resolves")
    ack.add_argument("id", help="the device id")
    ack.add_argument("--by", type=_ack_text("by"), default=_user(),
                     help="who acknowledges (default: the user running the command; at most "
                          "64 characters)")
    ack.add_argument("--note", type=_ack_text("note"),
                     help="a note for the others on call (at most 500 characters)")
    ack.set_defaults(func=cmd_ack)

    reload = sub.add_parser(
        "reload", help="make the running daemon load model.dir again (the old set stays if "
                       "the new one fails)")
    reload.set_defaults(func=cmd_reload)

    check = sub.add_parser("check-config", help="validate and print the effective configuration")
    check.set_defaults(func=cmd_check_config)
    # `anomalyd check-config --config F` as well as `anomalyd --config F check-config`
    for command in sub.choices.values():
        command.add_argument("-c", "--config", type=Path, default=argparse.SUPPRESS,
                             help="configuration file (also accepted before the command)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except BrokerRefusedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BROKER
    except (ConfigError, ModelLoadError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        from daemon.shadow import ShadowMismatchError  # (its message says what to do)

        if isinstance(exc, ModelLoadError) and not isinstance(
                exc, ShadowMismatchError | ModelAccessError):
            print("hint: train a model set with `anomalyd train` "
                  "(add --force to replace an unusable one)", file=sys.stderr)
        return EXIT_USAGE
    except AnomalydError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
