"""One connection to the broker: a paho client with anomalyd's conventions.

Credentials, TLS, TCP_NODELAY, reconnect backoff, a start-up that retries until a deadline
and says clearly why it failed, paho's own network thread (``loop_start``: only that
thread writes to the socket; paho's writer is not safe for two), a watchdog that notices a
silent link within about one keepalive, and guarded callbacks: an exception escaping a paho
callback would kill the network thread while ``is_connected()`` kept saying True.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.config import MqttConfig
from daemon.errors import BrokerError, BrokerRefusedError, StoppedWhileStartingError
from daemon.hosts import is_loopback
from daemon.metrics import Metrics
from daemon.tls import client_context, describe_failure

log = structlog.get_logger("anomalyd.mqtt")

F = TypeVar("F", bound=Callable[..., Any])

#: What paho reports for a connection the broker closed without saying why (Mosquitto 2.0
#: for a client id taken over), or with the MQTT 5 reason for exactly that.
NO_REASON = frozenset({"Unspecified error", "Session taken over"})
#: A link the broker closes sooner than this after accepting it was dropped *early*...
STABLE_S = 60.0
#: ... and this many early drops in a row are no accident: most often another client
#: connects with the same client id (a second anomalyd with the same ``mqtt.client_id``),
#: and the broker closes the older connection each time (Mosquitto 2.0 without saying
#: why). The two would take the session from each other at the reconnect delay for ever.
EARLY_DROPS = 3
#: From then on the reconnect delay doubles with each early drop, up to this (at most
#: half of ``STABLE_S``, so two such clients still find each other's connections early).
EARLY_DROP_MAX_DELAY_S = 30.0
#: CONNACK refusals that may pass by themselves (a broker starting, busy or rate limiting):
#: a start they stop may be retried; any other (credentials, client id, protocol, QoS 0
#: only) needs the configuration or the broker changed (``BrokerRefusedError``).
PASSING_REFUSALS = frozenset({"Server unavailable", "Server busy", "Quota exceeded",
                              "Connection rate exceeded", "Use another server", "Server moved"})
#: paho's reason code when it closes a connection that heard nothing for ``keepalive_s``
#: (before a CONNACK too): not the other end closing it
KEEPALIVE_TIMEOUT = 141


def refusal(reason: str, said: str) -> BrokerError:
    """The error for a broker's CONNACK refusal ``reason``: ``BrokerRefusedError`` unless
    it may pass by itself (``PASSING_REFUSALS``)."""
    return (BrokerError if reason in PASSING_REFUSALS else BrokerRefusedError)(said)


def guard(metrics: Metrics, where: str, fn: F) -> F:
    """Wrap a paho callback so that no exception can escape it: log, count, carry on."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception:
            metrics.callback_errors.labels(where).inc()
            log.exception("callback_failed", where=where)
            return None

    return wrapper  # type: ignore[return-value]


def ping(client: paho.Client) -> None:
    """Send a PINGREQ from a thread other than paho's network thread.

    paho's own ``_send_pingreq`` marks the ping as unanswered (``_ping_t``) only after
    queueing it, which is right on the network thread, the only one that handles the
    PINGRESP. From another thread the answer can be handled in between: its mark (0) is
    then overwritten, the ping looks unanswered forever, and a healthy link is dropped
    ("Keep alive timeout", or our watchdog's ``broker_silent``; seen once in 200 pings).
    Here the mark is set first. (``_ping_t``, ``_send_simple_command``: paho 2.x
    internals, as in the watchdog; tests/test_faults.py and tests/test_mqtt_ping.py fail
    if they change.)"""
    client._ping_t = paho.time_func()
    if client._send_simple_command(paho.PINGREQ) != paho.MQTT_ERR_SUCCESS:
        client._ping_t = 0  # not sent (not connected): nothing to wait for


def password_in_clear(cfg: MqttConfig) -> bool:
    """Whether a username and password would cross a network unencrypted: given, without
    TLS, to a broker not on this machine's loopback."""
    return bool(cfg.username) and not cfg.tls.enabled and not is_loopback(cfg.host)


def set_credentials(client: paho.Client, cfg: MqttConfig) -> None:
    """Username/password and TLS from the configuration (before connecting)."""
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.secret())
    if cfg.tls.enabled:
        client.tls_set_context(client_context(cfg.tls))


def connect_failure(cfg: MqttConfig, exc: OSError) -> str:
    """What a failed connection attempt means, for a person."""
    tls_hint = ""
    if cfg.tls.enabled and isinstance(exc, (ConnectionResetError, ssl.SSLEOFError)):
        # what a plain listener does with a TLS greeting (seen: reset, for 30 s of retries)
        tls_hint = (f" (mqtt.tls.enabled: is {cfg.port} the broker's TLS listener? "
                    "Mosquitto's is usually 8883)")
    if isinstance(exc, ssl.SSLError):
        return f"broker at {cfg.host}:{cfg.port}: {describe_failure(exc)}{tls_hint}"
    return f"cannot reach broker at {cfg.host}:{cfg.port}: {exc}{tls_hint}"


def closed_unanswered(cfg: MqttConfig, times: int) -> str:
    """Why a broker may have closed the connection ``times`` times without a CONNACK."""
    said = (f"broker at {cfg.host}:{cfg.port} closed the connection {times} time(s) "
            "without answering CONNECT")
    # a TLS listener does that with a plain MQTT greeting (seen: mosquitto/secure/'s 8883
    # with MQTT_TLS unset, 30 s of silent retries, then a message about MQTT 3.1.1 alone)
    tls = ("" if cfg.tls.enabled else
           f"; is {cfg.port} a TLS listener (Mosquitto's usually is 8883)? Then set "
           "mqtt.tls.enabled (MQTT_TLS=true)")
    if cfg.protocol == "5":  # an MQTT 5 broker that refuses a client says why
        return f"{said}: it does not answer as an MQTT broker there{tls}; see the broker's log"
    # MQTT 3.1.1 has no reason codes: the broker just closes the connection
    return (f"{said}: it refuses something in it and cannot say what over MQTT 3.1.1, such "
            "as the QoS 1 Last Will of a broker that allows QoS 0 only (Mosquitto's "
            f"max_qos), or a client id or login its plugins refuse{tls}; see the broker's log")


def pause(seconds: float, cancel: threading.Event | None, what: str) -> None:
    """Wait ``seconds`` before the next connection attempt, or raise
    StoppedWhileStartingError(``what``) as soon as ``cancel`` is set (a signal)."""
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        raise StoppedWhileStartingError(what)


def unusable(connack_props: Any) -> str | None:
    """Why an MQTT 5 broker that accepted us cannot serve anomalyd, from its CONNACK: it
    allows QoS 0 only (Mosquitto's ``max_qos 0``), and disconnects a QoS 1 publisher."""
    if getattr(connack_props, "MaximumQoS", 1) == 0:
        return ("it allows QoS 0 only (Maximum QoS 0; Mosquitto's max_qos): anomalyd needs "
                "QoS 1, or readings and results could be lost")
    return None


class Link:
    """A paho client, connected and kept connected.

    ``persistent`` links keep a broker session across reconnects and restarts (fixed
    client id, v5 ``clean_start=False`` with a session expiry, 3.1.1
    ``clean_session=False``) and announce ``receive_maximum``; others start clean.
    ``on_up(client, session_present, connack_properties)`` runs on each connection,
    ``on_down()`` on each loss.

    A link the broker keeps closing soon after accepting it (``EARLY_DROPS`` times in a
    row, each within ``STABLE_S``) says so: ``last_error`` names the likely cause (another
    client with this client id) until a connection has lasted ``STABLE_S``, and the
    reconnect delay grows meanwhile, so two clients fighting over one session do not
    reconnect twice a second for ever.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        metrics: Metrics,
        *,
        name: str,
        client_id: str,
        persistent: bool,
        manual_ack: bool = False,
        will: tuple[str, bytes] | None = None,
        on_up: Callable[[paho.Client, bool, Any], None] | None = None,
        on_down: Callable[[], None] | None = None,
        on_message: Callable[[paho.Client, Any, paho.MQTTMessage], None] | None = None,
        on_publish: Callable[[int, str | None], None] | None = None,
        on_subscribe: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.name = name
        self.persistent = persistent
        self.v5 = cfg.protocol == "5"
        self._on_up = on_up
        self._on_down = on_down
        self._on_publish_mid = on_publish
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if self.v5 else not persistent,
            protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
            manual_ack=manual_ack,
        )
        self._connected = threading.Event()
        self._first_connect = threading.Event()
        self._connect_result: str | None = None
        self._ever_connected = False
        self._stopped = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.last_heard = time.monotonic()  # any packet from the broker (watchdog)
        self.last_error: str | None = None
        self.client_id = client_id
        self._up_since: float | None = None  # monotonic time of the current connection
        self._early_drops = 0  # connections in a row the broker closed within STABLE_S
        self._silenced = False  # the watchdog shut the socket (the broker went silent)
        self._closed_unanswered = 0  # connections closed before the first CONNACK
        self._drop_lock = threading.Lock()  # the network thread and the watchdog count
        #: why the broker keeps closing this link, while it does (see the class docstring)
        self.dropping: str | None = None
        self.reconnect_delay_s = cfg.reconnect_min_delay_s  # the current minimum
        c = self.client
        set_credentials(c, cfg)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.reconnect_delay_set(cfg.reconnect_min_delay_s, cfg.reconnect_max_delay_s)  # type: ignore[arg-type]  # paho accepts float seconds
        # 0: paho sends at once and never rescans its queue on a PUBACK (measured: a
        # quarter of the daemon's CPU under load); the caller caps what is in flight.
        c.max_inflight_messages_set(0)
        c.on_socket_open = guard(metrics, f"{name}.on_socket_open", self._socket_open)
        c.on_connect = guard(metrics, f"{name}.on_connect", self._connect_cb)
        c.on_connect_fail = guard(metrics, f"{name}.on_connect_fail", self._connect_fail)
        c.on_disconnect = guard(metrics, f"{name}.on_disconnect", self._disconnect_cb)
        if on_message is not None:
            c.on_message = guard(metrics, "on_message", self._heard_then(on_message))
        c.on_publish = guard(metrics, f"{name}.on_publish", self._publish_cb)
        if on_subscribe is not None:
            c.on_subscribe = guard(metrics, f"{name}.on_subscribe",
                                   lambda _c, _u, _mid, codes, _p: on_subscribe(list(codes)))

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, deadline: float, cancel: threading.Event | None = None) -> None:
        """Connect, retrying until ``deadline`` (monotonic; inf: forever); start the loop.

        Raises BrokerError when the broker cannot be reached in time or refuses us, and
        StoppedWhileStartingError as soon as ``cancel`` is set (a signal: the wait may be long).
        """
        cfg = self.cfg
        if cancel is not None and cancel.is_set():  # (the intake, once a handover is judged)
            raise StoppedWhileStartingError(f"stopped before connecting to {cfg.host}:{cfg.port}")
        delay = cfg.reconnect_min_delay_s
        while True:
            try:
                self._connect()
                break
            except ssl.SSLError as exc:
                # Retrying cannot fix a certificate: say what is wrong and stop.
                self.metrics.connection_errors.labels("tls").inc()
                self.last_error = connect_failure(cfg, exc)
                raise BrokerRefusedError(self.last_error) from exc
            except OSError as exc:
                self.last_error = connect_failure(cfg, exc)
                self.metrics.connection_errors.labels("unreachable").inc()
                if time.monotonic() + delay > deadline:
                    raise BrokerError(self.last_error) from exc
                log.warning("broker_unreachable", host=cfg.host, port=cfg.port,
                            error=str(exc), retry_in_s=delay)
                pause(delay, cancel, f"stopped while connecting to {cfg.host}:{cfg.port}")
                delay = min(delay * 2, cfg.reconnect_max_delay_s)
        self.client.loop_start()
        self._watchdog = threading.Thread(
            target=self._watch, name=f"mqtt-{self.name}-watchdog", daemon=True
        )
        self._watchdog.start()
        answered = deadline if deadline == float("inf") else max(
            deadline, time.monotonic() + 0.5)
        while not self._first_connect.wait(0.1) and time.monotonic() < answered:
            if cancel is not None and cancel.is_set():
                self.stop(1.0)
                raise StoppedWhileStartingError(
                    f"stopped while connecting to {cfg.host}:{cfg.port}")
        if not self._first_connect.is_set():
            self.stop(1.0)
            raise BrokerError(self._unanswered_error())
        if self._connect_result is not None:
            self.stop(1.0)
            raise refusal(self._connect_result, f"broker at {cfg.host}:{cfg.port} refused "
                          f"the connection: {self._connect_result}")

    def _unanswered_error(self) -> str:
        """Why no CONNACK came: the connection was closed each time (by the other end), or
        nothing answered at all (paho gave up after ``keepalive_s``, or the deadline came)."""
        cfg = self.cfg
        if self._closed_unanswered:
            return closed_unanswered(cfg, self._closed_unanswered)
        return (f"no answer to CONNECT from broker at {cfg.host}:{cfg.port} within "
                f"{cfg.connect_timeout_s:.0f}s: the connection was taken but nothing answered "
                f"(is an MQTT broker listening on {cfg.port}? Another service on that port, "
                "or a proxy or firewall that holds connections, does this)")

    def _connect(self) -> None:
        cfg = self.cfg
        if not self.v5:
            self.client.connect(cfg.host, cfg.port, cfg.keepalive_s)
            return
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.persistent:
            props.SessionExpiryInterval = cfg.session_expiry_s
            props.ReceiveMaximum = cfg.receive_maximum
        self.client.connect(cfg.host, cfg.port, cfg.keepalive_s,
                            clean_start=not self.persistent, properties=props)

    def stop(self, timeout: float) -> None:
        """Disconnect cleanly and join the network thread (within ``timeout``).

        A reconnection under way in the network thread when ``disconnect`` is called can
        overwrite paho's "disconnecting" state and connect again after it; the thread then
        lives on, reconnecting for ever (seen: a stopped daemon's output link kept taking
        over its namesake's connection every second). So the disconnect is said again
        until the thread has ended."""
        self._stopped.set()
        deadline = time.monotonic() + timeout
        thread = self.thread
        while True:
            self.client.disconnect()
            if thread is None or thread is threading.current_thread():
                return
            thread.join(min(0.2, max(0.0, deadline - time.monotonic())))
            if not thread.is_alive() or time.monotonic() >= deadline:
                return

    @property
    def thread(self) -> threading.Thread | None:
        # paho's own network thread, started by loop_start(); paho has no public accessor.
        t: threading.Thread | None = getattr(self.client, "_thread", None)
        return t

    @property
    def alive(self) -> bool:
        thread = self.thread
        return thread is not None and thread.is_alive()

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self.alive

    # -- watchdog ----------------------------------------------------------------------

    def _watch(self) -> None:
        """Notice a silent link within about one keepalive, and drop it.

        paho pings only after a whole keepalive without traffic and gives up one keepalive
        later: a cut link (no FIN, no RST) goes unnoticed for up to 2 x keepalive (measured:
        9 s at keepalive 5 s). Here: after half a keepalive without a packet from the
        broker, ping; no answer within another half, shut the socket down so paho's loop
        sees the loss and reconnects. paho's own ``_last_bytes_received`` cannot tell us
        about silence (paho resets it whenever it thinks it should ping), so inbound
        traffic is tracked by our callbacks and the ping's answer through paho's
        ``_ping_t`` (0 once PINGRESP arrived). ``_ping_t`` and ``_send_pingreq`` are paho
        2.x internals; tests/test_faults.py fails if they stop working.
        """
        client = self.client
        half = self.cfg.keepalive_s / 2
        pinged_at: float | None = None
        while not self._stopped.wait(0.25):
            if not self._connected.is_set():
                pinged_at = None
                continue
            try:
                now = time.monotonic()
                self._settled(now)
                heard = self.last_heard
                if pinged_at is not None and (heard > pinged_at or client._ping_t == 0):
                    pinged_at = None  # answered, by the PINGRESP or any other packet
                if pinged_at is None:
                    if now - heard >= half:
                        pinged_at = now
                        ping(client)
                elif now - pinged_at >= half:
                    pinged_at = None
                    self.metrics.connection_errors.labels("keepalive").inc()
                    log.warning("broker_silent", link=self.name, silent_s=round(now - heard, 2),
                                keepalive_s=self.cfg.keepalive_s, action="reconnect")
                    self._silenced = True  # our doing, not the broker's: not an early drop
                    sock = client.socket()
                    if isinstance(sock, socket.socket):  # SSLSocket is one too
                        with contextlib.suppress(OSError):  # already closed: fine
                            sock.shutdown(socket.SHUT_RDWR)
            except Exception:
                self.metrics.callback_errors.labels("watchdog").inc()
                log.exception("watchdog_failed", link=self.name)

    # -- paho callbacks (network thread; guarded) --------------------------------------

    def _heard_then(
        self, fn: Callable[[paho.Client, Any, paho.MQTTMessage], None]
    ) -> Callable[[paho.Client, Any, paho.MQTTMessage], None]:
        def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
            self.last_heard = time.monotonic()
            fn(client, userdata, msg)

        return on_message

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self.cfg.tcp_nodelay:
            # paho never sets TCP_NODELAY: small messages would wait for Nagle (~25 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _connect_cb(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        refused = str(reason) if reason.is_failure else unusable(props) if self.v5 else None
        if refused is not None:
            self._connect_result = refused
            self.last_error = f"broker refused the connection: {refused}"
            self.metrics.connection_errors.labels("refused").inc()
            log.error("broker_refused", link=self.name, reason=refused,
                      host=self.cfg.host, port=self.cfg.port)
            self._first_connect.set()
            return
        self._connect_result = None
        self.last_error = self.dropping
        self.last_heard = self._up_since = time.monotonic()
        self._silenced = False
        if self._ever_connected:
            self.metrics.reconnects.inc()
        self._ever_connected = True
        if self._on_up is not None:
            self._on_up(client, bool(flags.session_present), props)
        self._connected.set()
        log.info("broker_connected", link=self.name, host=self.cfg.host, port=self.cfg.port,
                 session_present=bool(flags.session_present))
        self._first_connect.set()

    def _connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self.metrics.connection_errors.labels("unreachable").inc()
        self.last_error = f"cannot reach broker at {self.cfg.host}:{self.cfg.port}"

    def _disconnect_cb(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if (not self._ever_connected and not self._stopped.is_set()
                and getattr(reason, "value", None) != KEEPALIVE_TIMEOUT):
            # closed before any CONNACK (see ``start``); not paho giving up on an answer
            self._closed_unanswered += 1
            if self._closed_unanswered == 1:  # said now, not only when start gives up
                log.warning("broker_closed_unanswered", link=self.name,
                            note=closed_unanswered(self.cfg, 1), retrying_for_s=(
                                self.cfg.connect_timeout_s or None))
        if self._on_down is not None:
            self._on_down()
        if was:
            # our own disconnect at a stop is no warning (an operator alerting on
            # warnings was paged by every clean shutdown)
            (log.info if self._stopped.is_set() else log.warning)(
                "broker_disconnected", link=self.name, reason=str(reason))
            if not self._stopped.is_set() and not self._silenced:
                self._dropped(time.monotonic(), str(reason))

    # -- a broker that keeps closing the link ------------------------------------------

    def _dropped(self, now: float, reason: str) -> None:
        """The broker closed the link (network thread): count an early drop, or start
        the count again after a connection that lasted."""
        with self._drop_lock:
            up = None if self._up_since is None else now - self._up_since
            self._up_since = None
            if up is None or up >= STABLE_S:
                self._early_drops = 0
                self._settle_delay()
                return
            self._early_drops += 1
            if self._early_drops >= EARLY_DROPS:
                self._suspect(up, reason)

    def _suspect(self, up: float, reason: str) -> None:
        """Say why the broker keeps closing the link and wait longer before reconnecting."""
        doublings = self._early_drops - EARLY_DROPS + 1
        cfg = self.cfg
        delay = min(cfg.reconnect_min_delay_s * 2.0**doublings,
                    max(EARLY_DROP_MAX_DELAY_S, cfg.reconnect_min_delay_s))
        self.reconnect_delay_s = delay
        # paho forgets its own doubling at each successful connection: set the minimum
        self.client.reconnect_delay_set(delay, max(delay, cfg.reconnect_max_delay_s))  # type: ignore[arg-type]  # paho accepts float seconds
        if "too large" in reason.lower():  # MQTT 5 "Packet too large"
            cause = ("it finds a packet too large: set mqtt.max_packet_bytes to the "
                     "broker's limit, which it does not announce")
        elif reason not in NO_REASON:
            cause = "see the broker's log for why"
        else:
            cause = (f"most likely another client connects with client id "
                     f"{self.client_id!r}, such as a second anomalyd with the same "
                     "mqtt.client_id (give each its own); else a packet it finds too large "
                     "(mqtt.max_packet_bytes) or a failing network; see the broker's log")
        self.dropping = (
            f"the broker closed the {self.name} link {self._early_drops} times in a row "
            f"within {STABLE_S:.0f} s of accepting it (last: {reason}); {cause}"
        )
        self.last_error = self.dropping
        self.metrics.connection_errors.labels("dropped_early").inc()
        log.error("broker_keeps_dropping", link=self.name, client_id=self.client_id,
                  early_drops=self._early_drops, connected_s=round(up, 2), reason=reason,
                  retry_in_s=delay, hint=cause)

    def _settled(self, now: float) -> None:
        """The watchdog's check: a connection that has lasted ``STABLE_S`` ends the count."""
        with self._drop_lock:
            up_since = self._up_since
            if self.dropping is not None and up_since is not None and now - up_since >= STABLE_S:
                self._early_drops = 0
                self._settle_delay()

    def _settle_delay(self) -> None:
        """Back to the configured reconnect delay, the suspicion lifted (lock held)."""
        if self.dropping is None:
            return
        cfg = self.cfg
        self.reconnect_delay_s = cfg.reconnect_min_delay_s
        self.client.reconnect_delay_set(cfg.reconnect_min_delay_s, cfg.reconnect_max_delay_s)  # type: ignore[arg-type]  # paho accepts float seconds
        log.info("broker_link_stable", link=self.name, client_id=self.client_id,
                 stable_s=STABLE_S)
        self.dropping = None
        if self.last_error is not None and self._connected.is_set():
            self.last_error = None

    def _publish_cb(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        self.last_heard = time.monotonic()
        if self._on_publish_mid is not None:
            # MQTT 5: a PUBACK may refuse the message (e.g. the broker's ACL): not stored
            refused = str(reason) if self.v5 and reason.is_failure else None
            self._on_publish_mid(mid, refused)
