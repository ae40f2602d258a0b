"""One anomalyd per state directory (``daemon.state.lock``): a second daemon, or a
supervisor, on a directory in use is refused and the first is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon import state
from daemon.errors import ConfigError
from tests.broker import REPO, Broker, free_ports


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    fd = state.lock(tmp_path)
    with pytest.raises(state.StateDirInUseError, match=f"in use by another anomalyd \\(pid "
                       f"{os.getpid()}\\)"):
        state.lock(tmp_path)
    os.close(fd)
    os.close(state.lock(tmp_path))  # free again once let go



def test_a_lock_held_for_an_ended_holder_says_its_workers_hold_it(tmp_path: Path) -> None:
    """Workers inherit their supervisor's lock: with the supervisor gone (SIGKILL) they
    held it, and a new start was refused as "in use by another anomalyd" naming a pid
    that no longer ran. It now says the ended one's workers hold it."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    fd = state.lock(tmp_path)  # as a worker holds it, with the file naming its supervisor
    os.pwrite(fd, f"{ended.stdout.strip()}\n".encode(), 0)
    try:
        with pytest.raises(state.StateDirInUseError) as refused:
            state.lock(tmp_path)
        assert (f"in use by the workers of an anomalyd that has ended "
                f"(pid {ended.stdout.strip()})") in str(refused.value)
    finally:
        os.close(fd)

def test_a_killed_holder_leaves_the_directory_free(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from daemon import state; state.lock(Path(sys.argv[1])); print('held', flush=True); "
         "time.sleep(60)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(state.StateDirInUseError, match=f"pid {holder.pid}"):
            state.lock(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    os.close(state.lock(tmp_path))  # no stale lock after a SIGKILL


def test_a_second_daemon_on_the_directory_is_refused_and_the_first_runs_on(
    broker: Broker, start_daemon: Any, trained_model_dir: Path, tmp_path: Path,
) -> None:
    from tests.conftest import make_settings

    first = start_daemon(settings=make_settings(broker, trained_model_dir))
    directory = first.settings.state.dir
    second = make_settings(broker, trained_model_dir)
    second = second.model_copy(update={"state": second.state.model_copy(
        update={"dir": directory})})
    with pytest.raises(ConfigError, match="in use by another anomalyd"):
        start_daemon(settings=second)
    assert first.mqtt.intake.connected

    # a supervisor of workers is refused the same way, before it starts any
    env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port),
               MODEL_DIR=str(trained_model_dir), HEALTH_PORT=str(free_ports(2)), WORKERS="2",
               STATE_DIR=str(directory))
    done = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=REPO, env=env,
                          capture_output=True, timeout=120)
    assert done.returncode == 2, done.stderr.decode()[-2000:]
    assert b"in use by another anomalyd" in done.stderr
    assert b"workers_started" not in done.stderr + done.stdout
    # the same configuration started twice: the port is taken as well, and the state
    # directory says why (the port check said "stop what holds it")
    env["HEALTH_PORT"] = str(first.http.port)
    done = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=REPO, env=env,
                          capture_output=True, timeout=120)
    assert done.returncode == 2, done.stderr.decode()[-2000:]
    assert b"in use by another anomalyd" in done.stderr

    first.shutdown()
    deadline = time.monotonic() + 5
    while True:  # let go at the end of the shutdown
        try:
            os.close(state.lock(directory))
            break
        except state.StateDirInUseError:
            assert time.monotonic() < deadline, "the stopped daemon kept its state directory"
            time.sleep(0.05)
