"""Secure by default: TLS, credentials, topic ACLs, rate limits, tokens, no leaked secrets.

A Mosquitto is started with the repo's secure configuration (mosquitto/secure/) and
certificates made in the test session by scripts/dev-certs.sh.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr
from structlog.testing import capture_logs

from daemon.config import HttpConfig, LimitsConfig, ModelConfig, MqttConfig, Settings, TlsConfig
from daemon.errors import BrokerError
from tests.broker import REPO, Broker, free_port, wait_for_port
from tests.conftest_models import NORMAL_READING as NORMAL

pytestmark = pytest.mark.integration

SECURE = REPO / "mosquitto" / "secure"


def make_certs(*extra_env: tuple[str, str]) -> Path:
    # Not under pytest's tmp_path: mosquitto runs as its own user and must reach the files.
    out = Path(tempfile.mkdtemp(prefix="anomalyd-certs-"))
    out.chmod(0o755)
    env = dict(os.environ, **dict(extra_env))
    subprocess.run(
        [str(REPO / "scripts" / "dev-certs.sh"), str(out), "pump-001", "pump-002"],
        check=True,
        env=env,
        capture_output=True,
    )
    if os.geteuid() == 0 and shutil.which("mosquitto"):
        # mosquitto drops to its own user: it must be able to read its files.
        for p in [out, *out.iterdir()]:
            shutil.chown(p, user="mosquitto")
    return out


def secure_broker(certs: Path) -> Broker:
    return Broker(
        conf=SECURE / "mosquitto.conf",
        substitutions={
            "/mosquitto/certs/": f"{certs}/",
            "/mosquitto/config/acl": str(SECURE / "acl"),
            "/mosquitto/data/": "PERSISTENCE/",
        },
    ).start()


def daemon_settings(b: Broker, certs: Path, model_dir: Path) -> Settings:
    """The daemon logged in as ``anomalyd`` over TLS."""
    return settings(tls_mqtt(b, certs, "anomalyd", password(certs, "anomalyd")), model_dir)


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    out = make_certs()
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def sbroker(certs: Path) -> Iterator[Broker]:
    b = secure_broker(certs)
    yield b
    b.stop()


def password(certs: Path, user: str) -> str:
    return (certs / f"{user}.password").read_text()


def tls_mqtt(
    b: Broker,
    certs: Path,
    user: str | None,
    secret: str | None = None,
    ca: Path | None = None,
    **kw: Any,
) -> MqttConfig:
    return MqttConfig(
        host="localhost",
        port=b.port,
        client_id=f"sec-{user}-{free_port()}",
        username=user,
        password=SecretStr(secret) if secret else None,
        tls=TlsConfig(enabled=True, ca_file=ca or certs / "ca.crt"),
        connect_timeout_s=5,
        **kw,
    )


def settings(mqtt: MqttConfig, model_dir: Path, **kw: Any) -> Settings:
    return Settings(mqtt=mqtt, http=HttpConfig(port=0), model=ModelConfig(dir=model_dir), **kw)


class Client:
    """A TLS test client logged in as one user, collecting what it receives."""

    def __init__(self, b: Broker, certs: Path, user: str):
        self.got: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.c.username_pw_set(user, password(certs, user))
        self.c.tls_set(ca_certs=str(certs / "ca.crt"))
        self.suback: list[Any] = []
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda c, u, mid, codes, props: self.suback.extend(codes)
        connected = threading.Event()
        self.c.on_connect = lambda *a: connected.set()
        self.c.connect("localhost", b.port, 30)
        self.c.loop_start()
        assert connected.wait(5)

    def _on_message(self, c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.got.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def wait(self, pred: Callable[[str, bytes], bool], timeout: float = 10) -> tuple[str, bytes]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, p in self.got:
                    if pred(t, p):
                        return t, p
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"not received; got topics {[t for t, _ in self.got]}")
                self.cond.wait(left)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def client(sbroker: Broker, certs: Path) -> Iterator[Callable[[str], Client]]:
    made: list[Client] = []

    def make(user: str) -> Client:
        c = Client(sbroker, certs, user)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_anonymous_connection_is_refused_with_a_clear_error(
    sbroker: Broker, certs: Path, start_daemon: Any, trained_model_dir: Path
) -> None:
    with pytest.raises(BrokerError, match="refused the connection"):
        start_daemon(settings=settings(tls_mqtt(sbroker, certs, None), trained_model_dir))


def test_wrong_password_is_refused_with_a_clear_error(
    sbroker: Broker, certs: Path, start_daemon: Any, trained_model_dir: Path
) -> None:
    with pytest.raises(BrokerError, match="refused the connection"):
        start_daemon(
            settings=settings(tls_mqtt(sbroker, certs, "anomalyd", "wrong"), trained_model_dir)
        )


@pytest.mark.parametrize("case", ["password", "ca"])
def test_a_refusal_retrying_cannot_mend_exits_4_not_3(
    sbroker: Broker, certs: Path, trained_model_dir: Path, tmp_path: Path, case: str
) -> None:
    """A wrong password or an unknown CA exited 3, as an unreachable broker does, and the
    systemd unit (Restart=on-failure) started the daemon again every few seconds, for
    ever. They exit 4 now, which the unit does not restart; an unreachable broker is
    still 3 (tests/test_end_to_end.py)."""
    env = dict(os.environ, MQTT_HOST="localhost", MQTT_PORT=str(sbroker.port),
               MQTT_USERNAME="anomalyd", MQTT_TLS="true", MODEL_DIR=str(trained_model_dir),
               MQTT_PASSWORD="wrong" if case == "password" else password(certs, "anomalyd"),
               MQTT_CA_FILE=str(certs / "ca.crt") if case == "password" else
               str(make_certs() / "ca.crt"),
               HEALTH_PORT="0", STATE_DIR=str(tmp_path / "state"))
    res = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 4, res.stderr[-2000:]
    said = ("refused the connection: Not authorized" if case == "password" else
            "certificate was rejected")
    assert said in res.stderr
    unit = (REPO / "deploy" / "anomalyd.service").read_text()
    assert "RestartPreventExitStatus=2 4" in unit


def test_unknown_ca_is_refused_with_a_clear_error(
    sbroker: Broker,
    certs: Path,
    start_daemon: Any,
    trained_model_dir: Path,
    tmp_path: Path,
) -> None:
    other = make_certs()
    mqtt = tls_mqtt(sbroker, certs, "anomalyd", password(certs, "anomalyd"), ca=other / "ca.crt")
    with pytest.raises(BrokerError, match="certificate was rejected"):
        start_daemon(settings=settings(mqtt, trained_model_dir))


def test_expired_broker_certificate_is_refused_with_a_clear_error(
    start_daemon: Any, trained_model_dir: Path, tmp_path: Path
) -> None:
    expired = make_certs(("SERVER_CERT_DAYS", "-1"))
    b = secure_broker(expired)
    try:
        mqtt = tls_mqtt(b, expired, "anomalyd", password(expired, "anomalyd"))
        with pytest.raises(BrokerError, match="expired"):
            start_daemon(settings=settings(mqtt, trained_model_dir))
    finally:
        b.stop()


def test_daemon_runs_over_tls_and_devices_are_confined_to_their_own_topic(
    sbroker: Broker, certs: Path, start_daemon: Any, trained_model_dir: Path, client: Any
) -> None:
    start_daemon(settings=daemon_settings(sbroker, certs, trained_model_dir))
    alerts = client("alerts")
    alerts.c.subscribe("anomaly/#", qos=1)
    pump1 = client("pump-001")
    # Impersonation first, then its own reading: the broker keeps one client's order, so
    # once the second verdict is in, the first would have been judged before it.
    pump1.c.publish("sensors/pump-002/readings", orjson.dumps({**NORMAL, "seq": 1}), qos=1)
    pump1.c.publish("sensors/pump-001/readings", orjson.dumps({**NORMAL, "seq": 2}), qos=1)
    alerts.wait(lambda t, p: t == "anomaly/pump-001/verdict")
    assert not [t for t, _ in alerts.got if t.startswith("anomaly/pump-002/")]


def test_device_cannot_read_other_topics(
    sbroker: Broker, certs: Path, start_daemon: Any, trained_model_dir: Path, client: Any
) -> None:
    start_daemon(settings=daemon_settings(sbroker, certs, trained_model_dir))
    spy = client("pump-001")
    spy.c.subscribe("#", qos=1)
    alerts = client("alerts")
    alerts.c.subscribe("anomaly/#", qos=1)
    time.sleep(0.3)  # let both SUBACKs arrive before anything is published
    client("pump-002").c.publish("sensors/pump-002/readings", orjson.dumps(NORMAL), qos=1)
    alerts.wait(lambda t, p: t == "anomaly/pump-002/verdict")
    time.sleep(0.3)  # anything the spy could receive was sent before the verdict reached us
    assert spy.got == []


def test_flooding_device_is_rate_limited_and_others_are_still_judged(
    broker: Broker,
    trained_model_dir: Path,
    start_daemon: Any,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    s = Settings(
        mqtt=MqttConfig(host=broker.host, port=broker.port, client_id=f"rl-{free_port()}"),
        http=HttpConfig(port=0),
        model=ModelConfig(dir=trained_model_dir),
        limits=LimitsConfig(device_rate_per_s=5, device_burst=10),
    )
    svc = start_daemon(settings=s)
    col = collector_for(broker, ["anomaly/#"])
    pub = publisher_for(broker)
    t0 = time.monotonic()
    for seq in range(100):
        pub.client.publish("sensors/rl-flood/readings", orjson.dumps({**NORMAL, "seq": seq}), qos=1)
    for seq in range(5):
        pub.send("sensors/rl-calm/readings", {**NORMAL, "seq": seq})
    calm = col.json_on("anomaly/rl-calm/verdict", count=5)
    assert sorted(v["seq"] for v in calm) == list(range(5))

    def flood_outcomes() -> tuple[list[bytes], list[bytes]]:
        got = [(t, p) for t, p, _, _ in list(col.messages)]
        verdicts = [p for t, p in got if t == "anomaly/rl-flood/verdict"]
        dead = [p for t, p in got if t == "anomaly/dead-letter" and b'"rl-flood"' in p]
        return verdicts, dead

    deadline = time.monotonic() + 15
    verdicts, dead = flood_outcomes()
    while len(verdicts) + len(dead) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
        verdicts, dead = flood_outcomes()
    elapsed = time.monotonic() - t0
    # Each flooding reading got exactly one outcome: a verdict or a rate_limited dead letter.
    assert len(verdicts) + len(dead) == 100
    assert all(orjson.loads(p)["reason"] == "rate_limited" for p in dead)
    assert 10 <= len(verdicts) <= 10 + 5 * elapsed + 1  # burst, then 5 readings/s
    assert svc.metrics.dead_letters.labels("rate_limited")._value.get() == len(dead)


def _get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_no_secret_in_info_metrics_or_logs_and_token_guards_http(
    sbroker: Broker, certs: Path, trained_model_dir: Path, tmp_path: Path
) -> None:
    secret = password(certs, "anomalyd")
    token = "tok-" + os.urandom(8).hex()
    token_file = tmp_path / "token"
    token_file.write_text(token)
    http_port = free_port()
    env = dict(
        os.environ,
        MQTT_HOST="localhost",
        MQTT_PORT=str(sbroker.port),
        MQTT_USERNAME="anomalyd",
        MQTT_PASSWORD=secret,
        MQTT_TLS="true",
        MQTT_CA_FILE=str(certs / "ca.crt"),
        MODEL_DIR=str(trained_model_dir),
        HEALTH_PORT=str(http_port),
        HEALTH_TOKEN_FILE=str(token_file),
        MQTT_CLIENT_ID=f"sec-logs-{http_port}",
        LOG_LEVEL="DEBUG",
        STATE_DIR=str(tmp_path / "state"),  # not the repository's state/
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port("127.0.0.1", http_port, timeout=30)
        deadline = time.monotonic() + 30
        while _get(http_port, "/ready", token)[0] != 200:
            assert time.monotonic() < deadline, "daemon never became ready"
            time.sleep(0.1)
        assert _get(http_port, "/health")[0] == 200  # liveness needs no token
        for path in ("/metrics", "/info", "/models", "/ready"):
            assert _get(http_port, path)[0] == 401
            assert _get(http_port, path, "wrong")[0] == 401
        bodies = [_get(http_port, p, token) for p in ("/metrics", "/info", "/models")]
        assert all(status == 200 for status, _ in bodies)
        for _, body in bodies:
            assert secret.encode() not in body
            assert token.encode() not in body
            assert str(token_file).encode() not in body
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    logs = out + err
    assert b"broker_connected" in logs  # the logs were captured at all
    assert secret.encode() not in logs
    assert token.encode() not in logs


def test_the_tools_say_when_the_broker_refuses_them(sbroker: Broker, certs: Path) -> None:
    """watch and record retry on their own: a refusal (here a wrong password) must be said,
    not waited out in silence."""
    from daemon.tool_client import connect_tool_client

    heard: list[tuple[bool, str]] = []
    c = connect_tool_client(tls_mqtt(sbroker, certs, "anomalyd", "wrong"),
                            on_link=lambda up, why: heard.append((up, why)))
    c.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not heard:
            assert time.monotonic() < deadline, "no word of the refusal"
            time.sleep(0.05)
        time.sleep(1.0)  # paho closes the refused connection: that is no second message
    finally:
        c.loop_stop()
        c.disconnect()
    assert heard[0][0] is False and heard[0][1].startswith("the broker refused the connection: ")
    assert all(reason != "connection lost" for _, reason in heard)  # said once, as a refusal


@pytest.mark.parametrize(
    ("host", "username", "tls", "in_clear"),
    [
        ("broker.plant.local", "anomalyd", False, True),
        ("10.0.0.5", "anomalyd", False, True),
        ("broker.plant.local", "anomalyd", True, False),
        ("127.0.0.1", "anomalyd", False, False),
        ("localhost", "anomalyd", False, False),
        ("::1", "anomalyd", False, False),
        ("broker.plant.local", None, False, False),
    ],
)
def test_a_password_sent_unencrypted_over_a_network_is_named(
    host: str, username: str | None, tls: bool, in_clear: bool
) -> None:
    from daemon.config import MqttConfig, TlsConfig
    from daemon.mqtt_link import password_in_clear

    cfg = MqttConfig(host=host, username=username, password="pw" if username else None,
                     tls=TlsConfig(enabled=tls))
    assert password_in_clear(cfg) is in_clear


def test_tls_to_a_plain_listener_says_which_port_to_check(
    fresh_broker: Broker, start_daemon: Any, trained_model_dir: Path
) -> None:
    """MQTT_TLS=true against a plain listener: the broker resets the connection at the TLS
    greeting, and the error said only "Connection reset by peer" (a tester, after 30 s
    of retries)."""
    mqtt = MqttConfig(host=fresh_broker.host, port=fresh_broker.port, connect_timeout_s=2,
                      client_id=f"tls-plain-{free_port()}", tls=TlsConfig(enabled=True))
    with pytest.raises(BrokerError, match=rf"is {fresh_broker.port} the broker's TLS listener"):
        start_daemon(settings=settings(mqtt, trained_model_dir))


def test_plain_mqtt_to_a_tls_listener_says_to_turn_tls_on(
    sbroker: Broker, start_daemon: Any, trained_model_dir: Path
) -> None:
    """MQTT_PORT=8883 with MQTT_TLS forgotten (MQTT 5): the TLS listener closes each plain
    connection, and after connect_timeout_s the error spoke of MQTT 3.1.1 reason codes and
    a QoS 0 broker, not of TLS (a tester, against mosquitto/secure/)."""
    mqtt = MqttConfig(host=sbroker.host, port=sbroker.port, connect_timeout_s=2,
                      client_id=f"plain-tls-{free_port()}")
    said = rf"is {sbroker.port} a TLS listener .*MQTT_TLS=true"
    with capture_logs() as logs, pytest.raises(BrokerError, match=said) as caught:
        start_daemon(settings=settings(mqtt, trained_model_dir))
    assert "3.1.1" not in str(caught.value)
    # said at the first closed connection, not only once the start gives up (30 s later
    # by default, with nothing logged in between)
    closed = [e for e in logs if e["event"] == "broker_closed_unanswered"]
    assert closed and "a TLS listener" in closed[0]["note"]
