"""The MQTT edge: the only module that talks to paho-mqtt.

A paho message becomes an ``Inbound`` here and nothing past this module sees paho. Received
readings are acknowledged manually, in order, once their outputs are acknowledged by the
broker (see ``daemon.acks``). Outgoing QoS 1 publishes are capped (paho keys them by a
16-bit packet id and silently overwrites past 65,535 in flight). No callback blocks and no
exception escapes a callback: one that did would kill paho's network thread while
``is_connected()`` kept saying True.
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
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.acks import AckSequencer, Inbound
from daemon.config import MqttConfig
from daemon.errors import BrokerError
from daemon.metrics import Metrics
from daemon.tls import client_context, describe_failure

log = structlog.get_logger("anomalyd.mqtt")

# publish() results for which paho keeps the message and sends it, or resends it after the
# next (re)connection: for a QoS 1 message nothing more is needed from us.
_QUEUED = frozenset(
    {MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN,
     MQTTErrorCode.MQTT_ERR_CONN_LOST}
)

F = TypeVar("F", bound=Callable[..., Any])


class PublishWindow:
    """Outgoing QoS 1 publishes awaiting the broker's PUBACK, capped at ``limit``.

    This is the only cap on what we have in flight: paho's own (``max_inflight_messages``)
    is switched off, because paho rescans every queued message on each PUBACK when it is on
    (measured: a quarter of the daemon's CPU under load). The limit is lowered to the
    broker's Receive Maximum when the broker announces one.

    The PUBACK can be processed by the network thread before ``publish()`` has returned
    its packet id to us, so an ack for an unknown id is parked until the id is recorded.
    No lock of ours is held while calling into paho.
    """

    def __init__(self, limit: int) -> None:
        self.configured = limit
        self.limit = limit
        self._cond = threading.Condition(threading.Lock())
        self._taken = 0
        self._owners: dict[int, tuple[Inbound | None, bool]] = {}
        self._early: set[int] = set()

    def set_limit(self, limit: int) -> None:
        with self._cond:
            self.limit = max(1, min(self.configured, limit))
            self._cond.notify_all()

    def acquire(self, timeout: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: self._taken < self.limit, timeout):
                return False
            self._taken += 1
            return True

    def give_back(self) -> None:
        with self._cond:
            self._taken -= 1
            self._cond.notify()

    def record(self, mid: int, owner: Inbound | None, counted: bool = True) -> bool:
        """Remember who waits on ``mid``; returns True if it was already acknowledged.

        ``counted=False`` is for the rare publish made without taking a slot (the status
        message, sent from the network thread, which must not block).
        """
        with self._cond:
            if mid in self._early:
                self._early.discard(mid)
                if counted:
                    self._taken -= 1
                    self._cond.notify()
                return True
            self._owners[mid] = (owner, counted)
            return False

    def acked(self, mid: int) -> tuple[bool, Inbound | None]:
        """The broker acknowledged ``mid``: (known, owner)."""
        with self._cond:
            entry = self._owners.pop(mid, None)
            if entry is None:
                self._early.add(mid)
                return False, None
            if entry[1]:
                self._taken -= 1
                self._cond.notify()
        return True, entry[0]

    def __len__(self) -> int:
        return len(self._owners)


class MqttAdapter:
    """Subscribe, hand each received message to ``deliver``, publish, acknowledge."""

    def __init__(
        self,
        cfg: MqttConfig,
        subscription: str,
        status_topic: str,
        metrics: Metrics,
        deliver: Callable[[Inbound], None],
        client_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.subscription = subscription
        self.status_topic = status_topic
        self.metrics = metrics
        self._deliver = deliver
        self.v5 = cfg.protocol == "5"
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or cfg.client_id,
            clean_session=None if self.v5 else False,
            protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
            manual_ack=True,
        )
        self.window = PublishWindow(cfg.max_outstanding_publishes)
        self.acks = AckSequencer(self._send_ack, self._on_input_done)
        self._intake = True
        self._connected = threading.Event()
        self._connect_result: str | None = None
        self._first_connect = threading.Event()
        self._ever_connected = False
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stopped = threading.Event()
        self._last_inbound = time.monotonic()  # any packet from the broker (watchdog)
        self.last_error: str | None = None
        self.loop_crashed: str | None = None
        self._configure()

    # -- set-up ------------------------------------------------------------------------

    def _configure(self) -> None:
        c = self.client
        cfg = self.cfg
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.secret())
        if cfg.tls.enabled:
            c.tls_set_context(client_context(cfg.tls))
        c.will_set(self.status_topic, b"offline", qos=1, retain=True)
        c.reconnect_delay_set(cfg.reconnect_min_delay_s, cfg.reconnect_max_delay_s)  # type: ignore[arg-type]  # paho accepts float seconds
        # 0 = paho sends at once and never rescans its queue; PublishWindow is the cap.
        c.max_inflight_messages_set(0)
        c.on_socket_open = self._guard("on_socket_open", self._on_socket_open)
        c.on_connect = self._guard("on_connect", self._on_connect)
        c.on_connect_fail = self._guard("on_connect_fail", self._on_connect_fail)
        c.on_disconnect = self._guard("on_disconnect", self._on_disconnect)
        c.on_message = self._guard("on_message", self._on_message)
        c.on_publish = self._guard("on_publish", self._on_publish)

    def _guard(self, where: str, fn: F) -> F:
        """Wrap a paho callback so that no exception can escape it."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception:
                self.metrics.callback_errors.labels(where).inc()
                log.exception("callback_failed", where=where)
                return None

        return wrapper  # type: ignore[return-value]

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Connect (retrying until ``connect_timeout_s``) and start the network thread.

        Raises BrokerError when the broker cannot be reached in time or refuses us.
        """
        cfg = self.cfg
        deadline = time.monotonic() + cfg.connect_timeout_s
        delay = cfg.reconnect_min_delay_s
        while True:
            try:
                self._connect()
                break
            except ssl.SSLError as exc:
                # Retrying cannot fix a certificate: say what is wrong and stop.
                self.metrics.connection_errors.labels("tls").inc()
                self.last_error = f"broker at {cfg.host}:{cfg.port}: {describe_failure(exc)}"
                raise BrokerError(self.last_error) from exc
            except OSError as exc:
                self.last_error = f"cannot reach broker at {cfg.host}:{cfg.port}: {exc}"
                self.metrics.connection_errors.labels("unreachable").inc()
                if cfg.connect_timeout_s and time.monotonic() + delay > deadline:
                    raise BrokerError(self.last_error) from exc
                log.warning("broker_unreachable", host=cfg.host, port=cfg.port, error=str(exc),
                            retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, cfg.reconnect_max_delay_s)
        self._thread = threading.Thread(target=self._loop, name="mqtt-loop", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="mqtt-watchdog", daemon=True)
        self._watchdog.start()
        remaining = max(0.5, deadline - time.monotonic()) if cfg.connect_timeout_s else None
        if not self._first_connect.wait(remaining):
            raise BrokerError(
                f"no answer to CONNECT from broker at {cfg.host}:{cfg.port} "
                f"within {cfg.connect_timeout_s:.0f}s"
            )
        if self._connect_result is not None:
            self.client.disconnect()
            raise BrokerError(
                f"broker at {cfg.host}:{cfg.port} refused the connection: {self._connect_result}"
            )

    def _connect(self) -> None:
        cfg = self.cfg
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = cfg.session_expiry_s
            props.ReceiveMaximum = cfg.receive_maximum
            self.client.connect(
                cfg.host, cfg.port, cfg.keepalive_s, clean_start=False, properties=props
            )
        else:
            self.client.connect(cfg.host, cfg.port, cfg.keepalive_s)

    def _loop(self) -> None:
        try:
            self.client.loop_forever(retry_first_connection=True)
        except Exception as exc:
            self.loop_crashed = repr(exc)
            log.exception("mqtt_loop_crashed")

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
                heard = self._last_inbound
                if pinged_at is not None and (heard > pinged_at or client._ping_t == 0):
                    pinged_at = None  # answered, by the PINGRESP or any other packet
                if pinged_at is None:
                    if now - heard >= half:
                        pinged_at = now
                        client._send_pingreq()
                elif now - pinged_at >= half:
                    pinged_at = None
                    self.metrics.connection_errors.labels("keepalive").inc()
                    log.warning("broker_silent", silent_s=round(now - heard, 2),
                                keepalive_s=self.cfg.keepalive_s, action="reconnect")
                    sock = client.socket()
                    if isinstance(sock, socket.socket):  # SSLSocket is one too
                        with contextlib.suppress(OSError):  # already closed: fine
                            sock.shutdown(socket.SHUT_RDWR)
            except Exception:
                self.metrics.callback_errors.labels("watchdog").inc()
                log.exception("watchdog_failed")

    @property
    def loop_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self.loop_alive

    def pause_intake(self) -> None:
        """Stop taking readings: later ones stay unacked at the broker for redelivery."""
        self._intake = False

    def stop(self, timeout: float) -> None:
        """Publish ``offline``, disconnect cleanly and join the network thread."""
        if self.connected:
            info = self.client.publish(self.status_topic, b"offline", qos=1, retain=True)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(timeout=min(timeout, 2.0))
        self._stopped.set()
        self.client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- publishing (worker thread) -----------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, owner: Inbound | None, retain: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> bool:
        """QoS 1 publish that holds ``owner``'s ack until the broker acknowledges it.

        Blocks while the publish window is full (backpressure) and retries while paho
        cannot take the message. Returns False only if ``should_stop`` said so meanwhile
        (``owner`` then stays unacknowledged: the broker redelivers it).
        """
        window = self.window
        if owner is not None:
            self.acks.hold(owner)
        while True:
            while not window.acquire(timeout=0.5):
                if should_stop is not None and should_stop():
                    return self._gave_up(owner)
            try:
                info = self.client.publish(topic, payload, qos=1, retain=retain)
            except Exception:
                window.give_back()
                if owner is not None:
                    self.acks.release(owner)
                raise
            if info.rc in _QUEUED:
                break
            # Not taken (its packet id is still in use): nothing was queued; try again.
            window.give_back()
            self.metrics.callback_errors.labels("publish_retry").inc()
            log.warning("publish_retry", topic=topic, error=paho.error_string(info.rc))
            if should_stop is not None and should_stop():
                return self._gave_up(owner)
            time.sleep(0.05)
        if window.record(info.mid, owner) and owner is not None:
            self.acks.release(owner)
        self.metrics.outstanding_publishes.set(len(window))
        return True

    def _gave_up(self, owner: Inbound | None) -> bool:
        if owner is not None:
            self.acks.forget(owner)
        return False

    # -- paho callbacks (network thread; never block, never raise) ---------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self.cfg.tcp_nodelay:
            # paho never sets TCP_NODELAY: small messages would wait for Nagle (~25 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            self._connect_result = str(reason)
            self.last_error = f"broker refused the connection: {reason}"
            self.metrics.connection_errors.labels("refused").inc()
            log.error("broker_refused", reason=str(reason), host=self.cfg.host,
                      port=self.cfg.port)
            self._first_connect.set()
            return
        self._connect_result = None
        self.last_error = None
        self._last_inbound = time.monotonic()
        if self._ever_connected:
            self.metrics.reconnects.inc()
        self._ever_connected = True
        # Honour the broker's Receive Maximum (MQTT v5): never more unacknowledged
        # publishes to it than it says it accepts.
        receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        self.window.set_limit(receive_max or self.cfg.max_outstanding_publishes)
        if self.v5:
            client.subscribe(self.subscription, options=SubscribeOptions(qos=1))
        else:
            client.subscribe(self.subscription, qos=1)
        info = client.publish(self.status_topic, b"online", qos=1, retain=True)
        # On the network thread nothing can acknowledge it before it is recorded.
        self.window.record(info.mid, None, counted=False)
        self._connected.set()
        self.metrics.connected.set(1)
        log.info("broker_connected", host=self.cfg.host, port=self.cfg.port,
                 session_present=bool(flags.session_present), subscription=self.subscription)
        self._first_connect.set()

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self.metrics.connection_errors.labels("unreachable").inc()
        self.last_error = f"cannot reach broker at {self.cfg.host}:{self.cfg.port}"

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self.metrics.connected.set(0)
        self.acks.new_session()
        self.metrics.unacked_inputs.set(0)
        if was:
            log.warning("broker_disconnected", reason=str(reason))

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._last_inbound = time.monotonic()
        if not self._intake:
            return  # not acked: the broker keeps it for our next session
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = msg._topic.decode("utf-8", "replace")
        inbound = Inbound(
            msg.mid, msg.qos, topic, bytes(msg.payload), time.monotonic(), time.time()
        )
        self.metrics.messages.inc()
        self.acks.register(inbound)
        try:
            self._deliver(inbound)
        except BaseException:
            # Not handed over: leave it unacked (the broker resends it on our next
            # session) without blocking the acks of later messages; the guard logs it.
            self.acks.forget(inbound)
            raise

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        self._last_inbound = time.monotonic()
        _, owner = self.window.acked(mid)
        if owner is not None:
            self.acks.release(owner)

    # -- acknowledgements --------------------------------------------------------------

    def _send_ack(self, mid: int) -> None:
        self.client.ack(mid, 1)

    def _on_input_done(self, msg: Inbound) -> None:
        self.metrics.end_to_end_seconds.observe(time.monotonic() - msg.received_at)
