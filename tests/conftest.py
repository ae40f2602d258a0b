"""Shared fixtures: a real Mosquitto, trained models (tests.conftest_models), the daemon."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import HttpConfig, ModelConfig, MqttConfig, Settings, StateConfig
from daemon.metrics import Metrics
from daemon.models import ModelBundle, load_bundle
from daemon.service import Service
from tests.broker import Broker
from tests.mqtt_client import Collector, Publisher

pytest_plugins = ["tests.conftest_models"]

_ids = itertools.count()


def _named_broker() -> Broker | None:
    named = os.environ.get("ANOMALYD_TEST_BROKER")
    if not named:
        return None
    host, _, port = named.rpartition(":")
    return Broker(host=host or "127.0.0.1", port=int(port))


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """One Mosquitto for the session (tests that restart or kill it use fresh_broker)."""
    named = _named_broker()
    if named is not None:
        yield named
        return
    b = Broker().start()
    yield b
    b.stop()


@pytest.fixture
def fresh_broker() -> Iterator[Broker]:
    b = Broker().start()
    yield b
    b.stop()


def make_settings(b: Broker, model_dir: Path, **mqtt: Any) -> Settings:
    return Settings(
        mqtt=MqttConfig(
            host=b.host,
            port=b.port,
            client_id=f"anomalyd-test-{os.getpid()}-{next(_ids)}",
            connect_timeout_s=5,
            **mqtt,
        ),
        http=HttpConfig(port=0),
        model=ModelConfig(dir=model_dir),
        # never the repository's state/: each daemon starts without saved device state
        state=StateConfig(dir=Path(tempfile.mkdtemp(prefix="anomalyd-state-"))),
    )


@pytest.fixture
def start_daemon(
    trained_model_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., Service]]:
    """Start in-process daemons against a broker; all are shut down at teardown.

    Settings left with the default state directory (``state/`` under the working
    directory, i.e. the repository) get a temporary one instead."""
    started: list[Service] = []
    bundle = load_bundle(trained_model_dir)

    def start(
        b: Broker | None = None,
        settings: Settings | None = None,
        model: ModelBundle | None = None,
        **mqtt: Any,
    ) -> Service:
        if settings is None:
            assert b is not None, "give a broker or complete settings"
            settings = make_settings(b, trained_model_dir, **mqtt)
        if settings.state.dir == StateConfig().dir:
            state = settings.state.model_copy(update={"dir": tmp_path / f"state-{len(started)}"})
            settings = settings.model_copy(update={"state": state})
        svc = Service(settings, model or bundle, Metrics())
        svc.start()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        if svc.mqtt.loop_alive:
            svc.shutdown()


@pytest.fixture
def collector_for() -> Iterator[Callable[..., Collector]]:
    made: list[Collector] = []

    def make(b: Broker, filters: list[str]) -> Collector:
        c = Collector(b.host, b.port, filters)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def publisher_for() -> Iterator[Callable[[Broker], Publisher]]:
    made: list[Publisher] = []

    def make(b: Broker) -> Publisher:
        p = Publisher(b.host, b.port)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture(scope="session", autouse=True)
def _repository_state_left_alone() -> Iterator[None]:
    """No test may write device state into the repository's own ``state/`` directory."""
    repo_state = Path(__file__).resolve().parent.parent / "state"
    existed = repo_state.exists()
    yield
    if not existed and repo_state.exists():
        pytest.fail(f"a test wrote daemon state into {repo_state}: give it a temporary STATE_DIR")
