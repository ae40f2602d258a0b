"""The MQTT edge: with ``daemon.mqtt_link``, the only code that talks to paho-mqtt.

A paho message becomes an ``Inbound`` here and nothing past this module sees paho. Received
readings are acknowledged manually, in order, once their outputs are acknowledged by the
broker (see ``daemon.acks``). Outgoing QoS 1 publishes are capped (paho keys them by a
16-bit packet id and silently overwrites past 65,535 in flight).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.acks import AckSequencer, Inbound
from daemon.config import MqttConfig
from daemon.metrics import Metrics
from daemon.mqtt_link import Link

log = structlog.get_logger("anomalyd.mqtt")

# publish() results for which paho keeps the message and sends it, or resends it after the
# next (re)connection: for a QoS 1 message nothing more is needed from us.
_QUEUED = frozenset(
    {MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN,
     MQTTErrorCode.MQTT_ERR_CONN_LOST}
)


#: ``PublishWindow.record``: waiting for the broker's PUBACK, or acknowledged already.
PENDING = "pending"
ACKED = "acked"
#: A refused publish (a PUBACK with a failure reason: MQTT 5) is tried again after 1 s,
#: then after twice as long each time, up to this.
RETRY_MAX_S = 30.0
#: How long ``start_intake`` waits for the broker to grant the readings' subscription.
SUBSCRIBE_WAIT_S = 10.0

Message = tuple[str, bytes, bool]  # topic, payload, retain


class PublishWindow:
    """Outgoing QoS 1 publishes awaiting the broker's PUBACK, capped at ``limit``.

    This is the only cap on what we have in flight: paho's own (``max_inflight_messages``)
    is switched off, because paho rescans every queued message on each PUBACK when it is on
    (measured: a quarter of the daemon's CPU under load). The limit is lowered to the
    broker's Receive Maximum when the broker announces one.

    The PUBACK can be processed by the network thread before ``publish()`` has returned
    its packet id to us, so an ack for an unknown id is parked until the id is recorded.
    No lock of ours is held while calling into paho.

    A publish the broker refuses (MQTT 5: a PUBACK with a failure reason, e.g. "Not
    authorized" when its ACL does not let us write the topic) keeps its slot: it is not at
    the broker, so its reading stays unacknowledged, and the caller publishes it again.
    """

    def __init__(self, limit: int) -> None:
        self.configured = limit
        self.limit = limit
        self._cond = threading.Condition(threading.Lock())
        self._taken = 0
        # mid -> (owner, counted, message, attempt): what a refusal needs to publish again
        self._owners: dict[int, tuple[Inbound | None, bool, Message | None, int]] = {}
        self._early: dict[int, str | None] = {}  # acknowledged (None) or refused (why)

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

    def record(
        self, mid: int, owner: Inbound | None, counted: bool = True,
        message: Message | None = None, attempt: int = 0,
    ) -> str:
        """Remember who waits on ``mid`` (``message``: what to publish again if refused;
        ``attempt``: how many refusals came before). Returns ``PENDING``, ``ACKED`` if the
        broker acknowledged it already (its slot is free), or the broker's reason if it
        refused it already (its slot is kept).

        ``counted=False`` is for the rare publish made without taking a slot (the status
        message, sent from the network thread, which must not block).
        """
        with self._cond:
            if mid in self._early:
                refused = self._early.pop(mid)
                if refused is not None:
                    return refused
                if counted:
                    self._taken -= 1
                    self._cond.notify()
                return ACKED
            self._owners[mid] = (owner, counted, message, attempt)
            return PENDING

    def acked(self, mid: int) -> tuple[bool, Inbound | None, int]:
        """The broker acknowledged ``mid``: (known, owner, refusals before it)."""
        with self._cond:
            entry = self._owners.pop(mid, None)
            if entry is None:
                self._early[mid] = None
                return False, None, 0
            if entry[1]:
                self._taken -= 1
                self._cond.notify()
        return True, entry[0], entry[3]

    def refused(
        self, mid: int, reason: str
    ) -> tuple[Inbound | None, Message | None, int] | None:
        """The broker refused ``mid``: (owner, message, refusals before it), its slot kept
        for the retry; None if ``mid`` is not recorded yet (``record`` will say so)."""
        with self._cond:
            entry = self._owners.pop(mid, None)
            if entry is None:
                self._early[mid] = reason
                return None
        if not entry[1]:  # took no slot (a message no reading waits on): not published again
            return entry[0], None, entry[3]
        return entry[0], entry[2], entry[3]

    def __len__(self) -> int:
        return len(self._owners)


class _Retry(NamedTuple):
    due: float  # monotonic
    topic: str
    payload: bytes
    retain: bool
    owner: Inbound | None
    attempt: int  # refusals so far


class MqttAdapter:
    """Subscribe, hand each received message to ``deliver``, publish, acknowledge.

    Two connections: ``intake`` (the persistent session: subscription, manual acks, the
    retained status and its Last Will) and ``output`` (verdicts, alerts, dead letters).
    The broker's PUBACKs for our outputs arrive on ``output``, so ``deliver`` may block
    the intake's network thread when the scorer falls behind: that stops reading from
    the intake socket, and TCP carries the backpressure to the broker, which keeps the
    readings. On one connection, blocking would also stop the PUBACKs the scorer waits
    for; and Mosquitto 2.0.11 does not keep to a client's Receive Maximum once acks flow
    (docs/reliability.md), so flow control alone would not bound the queue.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        subscription: str,
        status_topic: str,
        metrics: Metrics,
        deliver: Callable[[Inbound], None],
        client_id: str | None = None,
        owns: Callable[[str], bool] | None = None,
        stale_subscriptions: tuple[str, ...] = (),
        skip_retained: bool = True,
    ) -> None:
        self.cfg = cfg
        # Whether a reading delivered with the retain flag (the broker's stored copy, sent
        # at each subscription) is acknowledged unread rather than judged.
        self._skip_retained = skip_retained
        # What this connection has logged once already (``_once``): counted every time.
        self._said: set[str] = set()
        self.subscription = subscription
        # Device dispatch (daemon.partition): which topics this worker judges; the others
        # are acknowledged unread. None: every message is ours.
        self._owns = owns
        # Filters a persistent session may still hold from another layout (the shared
        # subscription before device dispatch, or the reverse): dropped at each connect.
        self._stale_subscriptions = stale_subscriptions
        self.status_topic = status_topic
        self.metrics = metrics
        self._deliver = deliver
        self.window = PublishWindow(cfg.max_outstanding_publishes)
        self.acks = AckSequencer(self._send_ack, self._on_input_done)
        # read at each scrape: set after a batch, it kept that batch's count while idle
        self.metrics.unacked_inputs.set_function(lambda: len(self.acks))
        # Publishes the broker refused, to be made again: (due, topic, payload, retain,
        # owner, refusals so far), in the order they were refused.
        self._retries: queue.SimpleQueue[_Retry | None] = queue.SimpleQueue()
        self._retrier: threading.Thread | None = None
        self._refusal_lock = threading.Lock()
        self._refused_now = 0  # refused publishes not accepted since
        self._refusal: str | None = None  # the newest refusal, while any is outstanding
        self._refusal_logged = float("-inf")
        self._intake = True
        self._broker_max_packet: int | None = None  # announced in the output link's CONNACK
        #: the broker should still hold this client's session at the first connection: the
        #: daemon ran before with this id (its device state was restored); set before start
        self.expects_session = False
        #: monotonic time of the newest message on the subscription, or of the latest
        #: (re)subscription if later (None before the first): how long nothing has come
        self.heard_at: float | None = None
        self._intake_connections = 0
        self._intake_started = False  # start_intake has connected it (it may be later)
        #: connections at which the broker no longer had the session it should have had
        #: (``broker_session_lost``): its retained messages are then likely gone too
        self.lost_sessions = 0
        #: why the broker did not grant the readings' subscription at QoS 1 (its SUBACK)
        self.subscription_problem: str | None = None
        # set once the broker has granted the readings' subscription on this connection
        self._subscribed = threading.Event()
        cid = client_id or cfg.client_id
        self.intake = Link(
            cfg, metrics, name="intake", client_id=cid, persistent=True, manual_ack=True,
            will=(status_topic, b"offline"), on_up=self._intake_up, on_down=self._intake_down,
            on_message=self._on_message, on_subscribe=self._intake_subscribed,
        )
        self.output = Link(
            cfg, metrics, name="output", client_id=f"{cid}-out", persistent=False,
            on_up=self._output_up, on_publish=self._on_output_acked,
        )
        self.client = self.intake.client  # the session's client (tests reach into it)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, intake: bool = True, cancel: threading.Event | None = None) -> None:
        """Connect both links (retrying until ``connect_timeout_s``), output first; the
        intake later (``start_intake``) if not ``intake``: readings taken over from a
        previous layout are judged first, while the broker keeps the live ones.

        Raises BrokerError when the broker cannot be reached in time or refuses us, and
        StoppedWhileStartingError once ``cancel`` is set.
        """
        self.output.start(self._deadline(), cancel)
        if intake:
            try:
                self.start_intake(cancel)
            except BaseException:
                self.output.stop(1.0)
                raise
        self._retrier = threading.Thread(target=self._retry_loop, name="publish-retry",
                                         daemon=True)
        self._retrier.start()

    def start_intake(self, cancel: threading.Event | None = None) -> None:
        """Connect the intake (the readings' session) and wait until the broker has
        granted its subscription (at most ``SUBSCRIBE_WAIT_S``); BrokerError as
        ``start``'s.

        Waiting for the grant, not only the connection: the subscription is sent once the
        broker accepts the connection, and a session the broker did not have yet (the
        first start, an expired one) receives only what is published after the broker
        has taken it. Returning before (as until 2026-12-07) let the daemon say it had
        started, and ``/ready`` say ready, while readings published then were never
        delivered to it (seen as a lost first reading in a test on a busy machine)."""
        self.intake.start(self._deadline(), cancel)
        self._intake_started = True
        until = time.monotonic() + SUBSCRIBE_WAIT_S
        while not self._subscribed.wait(0.05) and self.subscription_problem is None:
            if cancel is not None and cancel.is_set():
                return  # stopping: the caller sees it
            if time.monotonic() >= until:
                log.warning("subscription_not_granted_yet", subscription=self.subscription,
                            waited_s=SUBSCRIBE_WAIT_S,
                            note="readings published before the broker grants it are not "
                                 "delivered to a new session; /ready says not ready until then")
                return

    @property
    def subscribed(self) -> bool:
        """Whether the broker has granted the readings' subscription on this connection."""
        return self._subscribed.is_set()

    def _deadline(self) -> float:
        timeout = self.cfg.connect_timeout_s
        return time.monotonic() + timeout if timeout else float("inf")

    @property
    def last_error(self) -> str | None:
        return (self.subscription_problem or self.intake.last_error or self.output.last_error
                or self.refusal)

    @property
    def max_packet(self) -> int | None:
        """The largest packet the broker takes (bytes): the limit it announced (MQTT 5)
        or ``mqtt.max_packet_bytes``, the smaller; None if neither says."""
        limits = [x for x in (self._broker_max_packet, self.cfg.max_packet_bytes) if x]
        return min(limits) if limits else None

    @property
    def dropping(self) -> str | None:
        """Why the broker keeps closing a link soon after accepting it, while it does
        (``daemon.mqtt_link``: most likely a second client with the same client id)."""
        return self.intake.dropping or self.output.dropping

    @property
    def refusal(self) -> str | None:
        """Why the broker refuses some of our publishes, while any is still refused."""
        return self._refusal

    @property
    def loop_crashed(self) -> str | None:
        """Which network thread died, if one did while not stopping."""
        dead = [link.name for link in (self.intake, self.output)
                if link.thread is not None and not link.alive]
        return f"network thread of {', '.join(dead)} died" if dead else None

    @property
    def loop_alive(self) -> bool:
        return (self.intake.alive or not self._intake_started) and self.output.alive

    @property
    def connected(self) -> bool:
        return self.intake.connected and self.output.connected

    def pause_intake(self) -> None:
        """Stop taking readings: later ones stay unacked at the broker for redelivery."""
        self._intake = False

    def stop(self, timeout: float) -> None:
        """Publish ``offline`` on the session's link, disconnect both, join their threads."""
        if self.intake.connected:
            info = self.intake.client.publish(self.status_topic, b"offline", qos=1, retain=True)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(timeout=min(timeout, 2.0))
        self._retries.put(None)
        self.intake.stop(timeout)
        self.output.stop(timeout)

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
        client = self.output.client
        if owner is not None:
            self.acks.hold(owner)
        while True:
            while not window.acquire(timeout=0.5):
                if should_stop is not None and should_stop():
                    return self._gave_up(owner)
            try:
                info = client.publish(topic, payload, qos=1, retain=retain)
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
        state = window.record(info.mid, owner, message=(topic, payload, retain))
        if state is not PENDING:  # the broker was faster than this thread
            self._settle(state, (topic, payload, retain), owner, 0)
        self.metrics.outstanding_publishes.set(len(window))
        return True

    def _gave_up(self, owner: Inbound | None) -> bool:
        if owner is not None:
            self.acks.forget(owner)
        return False

    # -- link callbacks (network threads) ----------------------------------------------

    def _intake_up(self, client: paho.Client, session_present: bool, props: Any) -> None:
        self._subscribed.clear()
        if self.intake.v5:
            client.subscribe(self.subscription, options=SubscribeOptions(qos=1))
        else:
            client.subscribe(self.subscription, qos=1)
        for stale in self._stale_subscriptions:
            client.unsubscribe(stale)
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        self.metrics.connected.set(1 if self.output.connected else 0)
        log.info("subscribed", subscription=self.subscription, session_present=session_present)
        self.heard_at = time.monotonic()  # silence is counted from the subscription
        self._said.clear()
        self._intake_connections += 1
        expected = self._intake_connections > 1 or self.expects_session
        # (MQTT 5 with session_expiry_s = 0 keeps no session to find)
        keeps = not self.intake.v5 or self.cfg.session_expiry_s > 0
        if expected and keeps and not session_present:
            self.lost_sessions += 1
            self.metrics.sessions_lost.inc()
            log.warning(
                "broker_session_lost", client_id=self.intake.client_id,
                first_connection=self._intake_connections == 1,
                note="the broker no longer had this daemon's session (restarted without its "
                     "database, or the session expired: mqtt.session_expiry_s): readings "
                     "published while the daemon was not connected were not kept for it")

    def _intake_subscribed(self, codes: list[Any]) -> None:
        """The broker's answer to the readings' subscription (the stale filters are
        unsubscribed, not subscribed: this is the one SUBSCRIBE of the intake)."""
        code = codes[0] if codes else None
        if code is not None and code.is_failure:
            problem = (f"the broker refused the subscription to {self.subscription}: {code} "
                       "(its ACL may not let this user read the readings' topics); no "
                       "reading can arrive")
        elif code is not None and code.value == 0:
            problem = (f"the broker granted the subscription to {self.subscription} at QoS 0 "
                       "only (Mosquitto's max_qos): readings arrive at most once and are "
                       "lost in any outage; anomalyd needs QoS 1")
        else:
            if self.subscription_problem is not None:
                log.info("subscription_granted", subscription=self.subscription)
            self.subscription_problem = None
            self._subscribed.set()
            return
        if problem != self.subscription_problem:
            log.error("subscription_refused", subscription=self.subscription, answer=str(code))
        self.subscription_problem = problem
        self.metrics.connection_errors.labels("subscription").inc()

    def _intake_down(self) -> None:
        self._subscribed.clear()
        self.metrics.connected.set(0)
        self.acks.new_session()

    def _output_up(self, client: paho.Client, session_present: bool, props: Any) -> None:
        # Honour the broker's Receive Maximum (MQTT v5): never more unacknowledged
        # publishes to it than it says it accepts.
        receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        self.window.set_limit(receive_max or self.cfg.max_outstanding_publishes)
        # ... and its Maximum Packet Size: a larger packet would cost us the connection
        # (daemon.oversize makes results fit). A broker reconfigured meanwhile may change it.
        max_packet = getattr(props, "MaximumPacketSize", None) if props is not None else None
        if max_packet != self._broker_max_packet:
            log.info("broker_max_packet", max_packet_bytes=max_packet)
        self._broker_max_packet = max_packet
        self.metrics.connected.set(1 if self.intake.connected else 0)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.heard_at = time.monotonic()
        if not self._intake:
            return  # not acked: the broker keeps it for our next session
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = msg._topic.decode("utf-8", "replace")
        if self._owns is not None and not self._owns(topic):
            # Another worker's device: that worker has its own copy in its own session.
            self.metrics.others_messages.inc()
            self._pass_over(msg, topic)
            return
        if msg.retain and self._skip_retained:
            # The broker's stored copy, sent because we subscribed: a live message reaches
            # an existing subscription with the flag cleared (MQTT 3.1.1 and 5, Retain As
            # Published off), also when it was queued for our session while we were away.
            self.metrics.retained_skipped.inc()
            self._pass_over(msg, topic)
            self._once(log.info, "retained_reading_skipped", topic,
                       "the broker's stored copy of a reading its device published retained, "
                       "sent because this daemon subscribed; old news, acknowledged unjudged "
                       "(readings.retained); counted in "
                       "anomalyd_retained_readings_skipped_total")
            return
        if not msg.payload:
            # How MQTT clears a retained message: its subscribers get a zero-length copy.
            # No reading, and nothing a dead letter could show.
            self.metrics.empty_skipped.inc()
            self._pass_over(msg, topic)
            self._once(log.info, "empty_message_skipped", topic,
                       "a zero-length message (how a retained reading is cleared, e.g. "
                       "mosquitto_pub -r -n): no reading, acknowledged unjudged; counted in "
                       "anomalyd_empty_messages_skipped_total")
            return
        if not msg.qos:
            # Its device published at QoS 0 (the subscription is QoS 1): judged as usual,
            # but the broker keeps no such reading for anomalyd while it is away.
            self.metrics.qos0_readings.inc()
            self._once(log.warning, "readings_at_qos0", topic,
                       "this device publishes at QoS 0: the broker keeps none of its readings "
                       "while anomalyd is away or reconnecting (Mosquitto's "
                       "queue_qos0_messages is off by default); publish at QoS 1. Counted in "
                       "anomalyd_qos0_readings_total")
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

    def _once(self, say: Callable[..., Any], event: str, topic: str, hint: str) -> None:
        """Log ``event`` for the first message of its kind on this connection only (each
        is counted in the metrics): thousands of devices must not flood the log."""
        if event not in self._said:
            self._said.add(event)
            say(event, topic=topic, hint=f"{hint}; logged once per connection")

    def _pass_over(self, msg: paho.MQTTMessage, topic: str) -> None:
        """Acknowledge a received message unread, in its turn."""
        if msg.qos:
            other = Inbound(msg.mid, msg.qos, topic, b"", 0.0, 0.0)
            self.acks.register(other)
            self.acks.pass_over(other)

    def _on_output_acked(self, mid: int, refused: str | None) -> None:
        if refused is not None:
            entry = self.window.refused(mid, refused)
            if entry is not None:
                owner, message, attempt = entry
                if message is not None:
                    self._refused(*message, owner, refused, attempt)
            return
        _, owner, attempt = self.window.acked(mid)
        self._accepted(owner, attempt)

    def _accepted(self, owner: Inbound | None, attempt: int) -> None:
        """The broker took a publish (``attempt``: after that many refusals)."""
        if attempt:
            self._accepted_again()
        if owner is not None:
            self.acks.release(owner)

    def _settle(
        self, state: str, message: Message, owner: Inbound | None, attempt: int
    ) -> None:
        """A publish the broker answered before ``PublishWindow.record``: ``state`` is
        ``ACKED`` or the reason it was refused."""
        if state is ACKED:
            self._accepted(owner, attempt)
        else:
            self._refused(*message, owner, state, attempt)

    # -- publishes the broker refused ----------------------------------------------------

    def _refused(
        self, topic: str, payload: bytes, retain: bool, owner: Inbound | None, reason: str,
        attempt: int,
    ) -> None:
        """Publish it again later; its reading stays unacknowledged until it is accepted."""
        delay = min(RETRY_MAX_S, 2.0 ** attempt)
        self.metrics.publish_refusals.labels(reason).inc()
        with self._refusal_lock:
            if attempt == 0:
                self._refused_now += 1
            self._refusal = f"the broker refuses publishes to {topic}: {reason}"
            now = time.monotonic()
            say = now - self._refusal_logged >= 10.0  # at most a line every 10 s
            if say:
                self._refusal_logged = now
            outstanding = self._refused_now
        if say:
            log.error("publish_refused", topic=topic, reason=reason, retry_in_s=delay,
                      refused_outstanding=outstanding,
                      note="its reading stays unacknowledged at the broker until accepted")
        self._retries.put(_Retry(time.monotonic() + delay, topic, payload, retain, owner,
                                 attempt + 1))

    def _accepted_again(self) -> None:
        with self._refusal_lock:
            self._refused_now -= 1
            if self._refused_now == 0:
                self._refusal = None
                log.info("publish_accepted_again", note="the broker takes our publishes again")

    def _retry_loop(self) -> None:
        """Publish refused messages again when due (its own thread: never a network one)."""
        due: list[tuple[float, int, _Retry]] = []  # by due time
        order = itertools.count()
        while True:
            wait = None if not due else max(0.0, due[0][0] - time.monotonic())
            try:
                item = self._retries.get(timeout=wait)
            except queue.Empty:
                pass
            else:
                if item is None:  # stopping: what is still refused stays unacknowledged
                    return
                heapq.heappush(due, (item.due, next(order), item))
            while due and due[0][0] <= time.monotonic():
                item = heapq.heappop(due)[2]
                info = self.output.client.publish(item.topic, item.payload, qos=1,
                                                  retain=item.retain)
                if info.rc not in _QUEUED:  # its packet id still in use: a moment later
                    later = time.monotonic() + 0.05
                    heapq.heappush(due, (later, next(order), item._replace(due=later)))
                    break
                message = (item.topic, item.payload, item.retain)
                state = self.window.record(info.mid, item.owner, message=message,
                                           attempt=item.attempt)
                if state is not PENDING:
                    self._settle(state, message, item.owner, item.attempt)

    # -- acknowledgements --------------------------------------------------------------

    def _send_ack(self, mid: int) -> None:
        self.intake.client.ack(mid, 1)

    def _on_input_done(self, msg: Inbound) -> None:
        self.metrics.end_to_end_seconds.observe(time.monotonic() - msg.received_at)
