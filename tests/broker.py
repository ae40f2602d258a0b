"""A real Mosquitto for the tests: the repo's configuration on a free port.

Order of preference: a broker named by ``ANOMALYD_TEST_BROKER=host:port``; the local
``mosquitto`` binary started here; testcontainers when a Docker engine answers.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "mosquitto" / "mosquitto.conf"


_HANDED_OUT: set[int] = set()  # never the same port twice in one test run
_PICK = random.SystemRandom()


def _first_ephemeral_port() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    return free_ports(1)


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports (workers listen on ``base + i``), chosen
    below the kernel's ephemeral range: a port from that range can be given to any
    outgoing connection (every client socket of a test takes one) between the choice and
    the bind that needs it, which once cost a soak run its second worker ("Address
    already in use" on ``base + 1``). Where that range starts too low to leave room, the
    kernel chooses."""
    top = _first_ephemeral_port() - n
    for _ in range(200):
        base = _PICK.randrange(10000, top) if top > 11000 else _kernel_port()
        ports = range(base, base + n)
        if _HANDED_OUT.intersection(ports):
            continue
        held: list[socket.socket] = []
        try:
            for port in ports:
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        _HANDED_OUT.update(ports)
        return base
    raise RuntimeError(f"no {n} consecutive free ports found")


def _kernel_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


@dataclass
class Broker:
    """A Mosquitto process owned by the test (restartable, killable)."""

    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="anomalyd-mq-")))
    extra_conf: str = ""
    conf: Path = CONF
    # Literal replacements in the configuration (e.g. the secure config's certificate dir).
    substitutions: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        text = self.conf.read_text()
        for old, new in self.substitutions.items():
            text = text.replace(old, new)
        text = re.sub(r"^listener .*$", f"listener {self.port} {self.host}", text, flags=re.M)
        text = re.sub(
            r"^persistence_location .*$", f"persistence_location {self.workdir}/", text, flags=re.M
        )
        return text + "\n" + self.extra_conf + "\n"

    def start(self) -> Broker:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        # As root, mosquitto drops to its own user, which must own the persistence dir.
        if os.geteuid() == 0:
            shutil.chown(self.workdir, user="mosquitto") if _has_user("mosquitto") else None
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.host, self.port)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        p = self.workdir / "mosquitto.log"
        return p.read_text(errors="replace") if p.exists() else ""


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def mosquitto_binary() -> str:
    for candidate in (
        shutil.which("mosquitto"),
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("the mosquitto binary is not installed (apt-get install mosquitto)")


@contextlib.contextmanager
def acl_broker(acl_text: str) -> Iterator[tuple[Broker, Path]]:
    """A running broker with a password file (user ``anomalyd``, password ``secret``;
    anonymous clients allowed too) and the ACL ``acl_text``, and the ACL's path (rewrite it
    and send the broker SIGHUP to change it); stopped and removed afterwards. The files are
    not under pytest's tmp_path: mosquitto, run as root, drops to its own user and must
    read them."""
    folder = Path(tempfile.mkdtemp(prefix="anomalyd-acl-"))
    folder.chmod(0o755)
    acl = folder / "acl"
    acl.write_text(acl_text)
    passwords = folder / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "anomalyd", "secret"],
                   check=True, capture_output=True)
    for path in (acl, passwords):
        path.chmod(0o644)
        if os.geteuid() == 0 and _has_user("mosquitto"):
            shutil.chown(path, user="mosquitto")
    broker = Broker(extra_conf=f"password_file {passwords}\nacl_file {acl}\n").start()
    try:
        yield broker, acl
    finally:
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)
