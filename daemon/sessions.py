"""The broker sessions a worker layout keeps, and handing them over when the layout changes.

Each layout reads through its own persistent sessions: ``<client_id>`` for one daemon,
``<client_id>-<i>`` for worker ``i``. The broker keeps a session, queueing every reading
for it, for ``mqtt.session_expiry_s`` after its last use, whether or not a daemon will
ever use it again. So after a change of ``WORKERS`` or of ``service.dispatch``, the
sessions of the previous layout would go on queueing readings no one judges, and a later
return to that layout would replay them all as if they were live (stale verdicts and
alerts for readings hours old); a session of the new layout left from an older use would
do the same at once.

So before anything connects, the state directory's record of the sessions this daemon
keeps (``sessions.json``: the broker and each client id with its subscription) is compared
with the new layout's (:func:`plan`, pure). The same sessions: nothing to do. Otherwise
(:func:`hand_over`), in this order: a bridging session (``<client_id>-handover``) is
subscribed to every reading; every old session is resumed, unsubscribed (all at once) and
drained, each reading kept from the session whose worker judged it, into a file per new
owner (``daemon.spool``), judged there before any live reading; every new session is made
afresh and subscribed; the bridge, which held what was published in between, is drained
the same way; the sessions no longer used and the bridge are ended. A reading published in
the instant of a switch may be judged twice (at least once); in a handover that completes
none is lost, and none is judged as live hours later. The record is written once the
broker has done it all (with the bridge's name while it may be left at the broker).

Left: a change of broker ends nothing at the old one; without a record (a new state
directory, or one from before this record, with no ``layout.json`` either) nothing is
done: what the broker holds is unknown. A bridge the broker refuses (its ACL) is done
without, said in the log. A handover cut short is done again at the next start; the
bridge, resumed then, still holds what came meanwhile.
"""

from __future__ import annotations

import errno
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon import spool, state
from daemon.config import MqttConfig, Settings
from daemon.errors import BrokerError, BrokerRefusedError, ConfigError
from daemon.mqtt_link import connect_failure, pause, refusal, set_credentials
from daemon.partition import SINGLE, TopicOwnership, layout_dispatch
from daemon.state import write_bytes
from daemon.topics import (
    HANDOVER_LEVEL,
    TopicMatcher,
    could_match,
    is_marker,
    marker_topic,
    unshared,
)

log = structlog.get_logger("anomalyd.sessions")

#: The sessions the daemon of a state directory keeps at its broker.
SESSIONS_FILE = "sessions.json"
#: The record's list of drained sessions still to be ended (a handover cut short).
ENDING = "ending"
#: How long one exchange with the broker (CONNACK, SUBACK) may take once connected.
ANSWER_S = 10.0
#: A session being drained has given all it queued once the marker published behind its
#: backlog has come back; where none can (the broker's ACL refuses its subscription or
#: publication), once nothing has come for this long...
QUIET_S = 0.5
#: ... or, the marker published, once nothing has come for this long (a broker whose queue
#: for the session was full when the marker came drops it)...
MARKER_QUIET_S = 5.0
#: ... and it is given at most this long (a backlog of hours at a high rate).
DRAIN_MAX_S = 120.0


def subscriptions(settings: Settings) -> tuple[str, tuple[str, ...]]:
    """(the filter to subscribe to, filters an old session of another layout may hold).

    With several workers and shared dispatch the subscription is shared (each reading goes
    to one of them); otherwise every worker subscribes to the filter itself (device
    dispatch: each keeps its own devices, ``daemon.partition``). A filter the user wrote
    as ``$share/...`` is left as it is.
    """
    plain, svc = settings.mqtt.subscription, settings.service
    if plain.startswith("$share/"):
        return plain, ()
    shared = f"$share/{svc.share_group}/{plain}"
    if svc.workers > 1 and svc.dispatch == "shared":
        return shared, (plain,)
    return plain, (shared,) if svc.workers > 1 else ()


def intake_client_id(settings: Settings, worker_index: int | None) -> str:
    """The client id of a daemon's (``None``) or a worker's persistent session."""
    base = settings.mqtt.client_id
    return base if worker_index is None else f"{base}-{worker_index}"


@dataclass(frozen=True)
class Record:
    """The persistent sessions of one layout at one broker: client id → subscription."""

    broker: str
    dispatch: str  # "single", "device" or "shared"
    sessions: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"broker": self.broker, "dispatch": self.dispatch,
                "sessions": dict(self.sessions)}


def current(settings: Settings) -> Record:
    """The sessions this configuration's daemon (or its workers) will use."""
    n = settings.service.workers
    subscription, _ = subscriptions(settings)
    ids = [intake_client_id(settings, None)] if n == 1 else [
        intake_client_id(settings, i) for i in range(n)]
    return Record(broker=_broker(settings.mqtt),
                  dispatch=layout_dispatch(n, settings.service.dispatch),
                  sessions=dict.fromkeys(ids, subscription))


def previous(
    directory: Path, settings: Settings, layout: Mapping[str, Any] | None
) -> Record | None:
    """What the state directory says the last daemon kept: its ``sessions.json``, or for a
    directory from before that file, its ``layout.json`` (``layout``, as it was before this
    start) read with this configuration's client id and broker. None if neither says."""
    try:
        raw = orjson.loads((directory / SESSIONS_FILE).read_bytes())
        sessions = raw["sessions"]
        if isinstance(raw["broker"], str) and isinstance(sessions, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in sessions.items()):
            return Record(raw["broker"], str(raw.get("dispatch", "")), sessions)
        log.warning("sessions_record_unreadable", path=str(directory / SESSIONS_FILE),
                    note="the previous layout's broker sessions are left as they are")
        return None
    except FileNotFoundError:
        pass
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        log.warning("sessions_record_unreadable", path=str(directory / SESSIONS_FILE),
                    error=str(exc), note="the previous layout's broker sessions are left "
                    "as they are")
        return None
    if layout is None:
        return None
    try:
        workers, dispatch = int(layout["workers"]), str(layout["dispatch"])
        if workers < 1:
            return None
        svc = settings.service.model_copy(update={
            "workers": workers, "dispatch": "device" if dispatch == SINGLE else dispatch})
        return current(settings.model_copy(update={"service": svc}))
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Plan:
    drain: tuple[str, ...] = ()  # old sessions whose queued readings are taken over
    end: tuple[str, ...] = ()  # sessions no longer used: ended once drained
    fresh: tuple[str, ...] = ()  # sessions started anew (and subscribed) before use
    keep: tuple[str, ...] = ()  # sessions used as they are


def plan(before: Record | None, now: Record) -> Plan:
    """What to do at the broker so that ``now``'s sessions judge each reading once.

    Unknown ``before`` (or another broker's), or the same sessions: nothing; each session
    is used as it is. Else every old session is drained and every new one started afresh
    (a session kept across a change of layout would hold readings for devices its worker
    no longer owns, or not hold readings it now owns).
    """
    if before is None or before.broker != now.broker or before == now:
        return Plan(keep=tuple(now.sessions))
    return Plan(drain=tuple(before.sessions), fresh=tuple(now.sessions),
                end=tuple(cid for cid in before.sessions if cid not in now.sessions))


def _owner(settings: Settings) -> Callable[[str], int | None]:
    """Which worker of this layout judges a reading on ``topic`` (None: the one daemon)."""
    n, svc = settings.service.workers, settings.service
    if n == 1:
        return lambda topic: None
    if svc.dispatch == "shared":
        return lambda topic: 0
    matcher = TopicMatcher(subscriptions(settings)[0], settings.limits.device_id_pattern)
    return TopicOwnership(matcher, 0, n).owner_of


def _broker(cfg: MqttConfig) -> str:
    return f"{cfg.host}:{cfg.port}"


def take_over(settings: Settings, directory: Path, workers: int,
              cancel: threading.Event | None = None) -> int:
    """Take the state directory for this process (``state.lock``) and settle what the
    previous layout left in it and at the broker: each device's saved state re-cut for
    its owner (``state.repartition``), the broker sessions handed over. Run once, before
    any worker starts (by the supervisor, or a single daemon with ``workers`` 1). Returns
    the lock's descriptor; if anything fails the directory is let go."""
    lock = state.lock(directory)
    try:
        hand_over(settings, directory,
                  state.repartition(directory, workers, settings.service.dispatch), cancel)
    except BaseException as exc:
        os.close(lock)
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
            raise ConfigError(
                f"cannot write in state.dir {directory} while settling what the previous "
                f"layout left ({exc.strerror}): nothing is lost, the readings already taken "
                f"from the broker stay in {directory} ({spool.JOURNAL}, handover*.jsonl) and "
                "the rest at the broker, for the next start; make room there (a handover "
                "needs about twice the size of what it takes) and start again") from exc
        raise
    return lock


#: What writing in the state directory can fail with, as opposed to a network error.
_DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES,
                          errno.EPERM})


def hand_over(settings: Settings, directory: Path, layout: Mapping[str, Any] | None,
              cancel: threading.Event | None = None) -> Plan:
    """Settle the broker sessions for this layout (see the module's docstring); run once,
    before the daemon or any worker connects. ``layout``: the ``layout.json`` this start
    found (``daemon.state.repartition`` returns it).

    Raises BrokerError when the broker cannot be reached within ``mqtt.connect_timeout_s``
    (the record is then left as it was, and the next start tries again), and
    StoppedWhileStartingError once ``cancel`` is set while it waits for the broker.
    """
    cfg = settings.mqtt
    now = current(settings)
    before = previous(directory, settings, layout)
    todo = plan(before, now)
    record = directory / SESSIONS_FILE
    if before is not None and not record.exists():
        # read from layout.json, which this start has rewritten already: kept, so that a
        # start that fails below leaves the next one the same work to do
        write_bytes(record, orjson.dumps(before.to_json()))
    keeps = cfg.protocol != "5" or cfg.session_expiry_s > 0  # else no session outlives us
    timeout = cfg.connect_timeout_s
    deadline = Deadline(time.monotonic() + timeout if timeout else float("inf"), cancel)
    everything = unshared(next(iter(now.sessions.values())))
    marker = _marker_topic(settings)
    left = _bridge_left(record)
    unended = _left_to_end(record)
    if unended and keeps:
        # a handover cut short while it ended the sessions it had drained: the record
        # names the new layout already, and they hold nothing the new sessions do not
        for cid in unended:
            _end(cfg, cid, deadline)
        log.info("handover_sessions_ended", client_ids=unended,
                 note="left by a handover cut short after the new sessions were in place")
        if before is not None:  # (its bridge, if one is left, is still to take over)
            write_bytes(record, orjson.dumps(_with_work_left(before, left, ())))
    if todo.fresh and before is not None and keeps:
        owner = _owner(settings)
        # 1. a bridging session, subscribed to every reading: what is published while the
        #    old sessions are drained and the new ones made waits there. Resumed: one left
        #    by a handover cut short still holds what came after it. Recorded first, so
        #    that a start after one cut short knows to take it over.
        bridge: str | None = f"{cfg.client_id}-handover"
        write_bytes(record, orjson.dumps(_with_work_left(before, bridge, ())))
        try:
            _connect_once(cfg, str(bridge), deadline, keep=True, subscription=everything,
                          resume=True)
        except BrokerError as exc:
            if "refused the connection" not in str(exc):
                raise
            log.warning("handover_bridge_refused", client_id=bridge, error=str(exc),
                        note="readings published during the handover may be lost")
            bridge = None
        # 2. the old sessions, unsubscribed at once and drained, each reading taken from
        #    the session whose worker judged it; on disk before anything is ended
        taken = _take(directory, owner, cfg, [
            (cid, before.sessions[cid], _was_owned(settings, before, cid))
            for cid in todo.drain], deadline, marker)
        # 3. the new sessions, made afresh and subscribed: they queue from now on. So the
        #    record names them from here on, with what is left to do (the bridge to take
        #    over, the old sessions to end): a start after a cut uses them as they are
        #    (made afresh again, they would drop what only they hold) and does the rest
        for cid in todo.fresh:
            _connect_once(cfg, cid, deadline, keep=False)
            _connect_once(cfg, cid, deadline, keep=True, subscription=now.sessions[cid])
        write_bytes(record, orjson.dumps(_with_work_left(now, bridge, todo.end)))
        # 4. what the bridge holds, after the old sessions' readings; then it goes
        if bridge is not None:
            taken += _take(directory, owner, cfg, [(bridge, everything, lambda topic: True)],
                           deadline, marker)
        # 5. the old sessions and the bridge end
        ending = [*todo.end, *([bridge] if bridge else [])]
        write_bytes(record, orjson.dumps(_with_work_left(now, None, ending)))
        for cid in ending:
            _end(cfg, cid, deadline)
        log.info("broker_sessions_handed_over", drained=list(todo.drain),
                 ended=list(todo.end), started=list(todo.fresh), readings_taken_over=taken,
                 note="what the previous layout's sessions had queued is judged by each "
                      "device's new worker before any live reading")
    else:
        if left is not None and keeps:
            # a handover cut short, and this start asks for no other: what its bridge
            # holds (published since) is judged, and the bridge goes
            taken = _take(directory, _owner(settings), cfg,
                          [(left, everything, lambda topic: True)], deadline, marker)
            _end(cfg, left, deadline)
            log.info("handover_bridge_taken_over", client_id=left, readings=taken)
        elif before != now or spool.journal_left(directory):
            # a handover not yet judged (or cut short taking) goes to its new owners
            spool.hand_to_workers(directory, _owner(settings))
    write_bytes(record, orjson.dumps(now.to_json()))
    return todo


def _take(directory: Path, owner: Callable[[str], int | None], cfg: MqttConfig,
          olds: Sequence[tuple[str, str, Callable[[str], bool]]], deadline: Deadline,
          marker: str | None) -> int:
    """Drain ``olds`` (:func:`_drain`) through the journal, then cut what it holds for
    each reading's owner (``spool.hand_to_workers``), also if the drain failed half-way;
    how many readings were taken."""
    journal = spool.Journal(directory)
    try:
        _drain(cfg, olds, deadline, journal, marker)
    finally:
        journal.close()
        spool.hand_to_workers(directory, owner)
    return journal.count


def _marker_topic(settings: Settings) -> str | None:
    """A topic of the daemon's own (under its status topic) for the marker that tells a
    drain it has had everything; None if the subscription would take it for a reading."""
    topic = marker_topic(settings.topics.status, os.urandom(4).hex())
    if could_match(settings.mqtt.subscription, topic, settings.limits.device_id_pattern):
        return None
    return topic


@dataclass(frozen=True)
class Deadline:
    """Until when the handover may wait for its broker (monotonic; inf: for ever), and
    the event that stops the wait (a signal: the handover then ends as if cut short)."""

    at: float
    cancel: threading.Event | None = None

    def sleep(self, seconds: float) -> None:
        pause(seconds, self.cancel, "stopped while handing the broker sessions over")


def _with_work_left(layout: Record, bridge: str | None, ending: Sequence[str]
                    ) -> dict[str, Any]:
    """The record of ``layout`` with what a handover has still to do: a ``bridge`` to
    take over, sessions it has drained to end."""
    return {**layout.to_json(), **({"bridge": bridge} if bridge else {}),
            **({ENDING: list(ending)} if ending else {})}


def _left_to_end(record: Path) -> list[str]:
    """The drained sessions a handover cut short had still to end (its record says)."""
    try:
        ending = orjson.loads(record.read_bytes()).get(ENDING)
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return []
    return [c for c in ending if isinstance(c, str)] if isinstance(ending, list) else []


def _bridge_left(record: Path) -> str | None:
    """The bridging session a handover cut short left at the broker (its record says)."""
    try:
        bridge = orjson.loads(record.read_bytes()).get("bridge")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return None
    return bridge if isinstance(bridge, str) else None


def _end(cfg: MqttConfig, client_id: str, deadline: Deadline) -> None:
    """End a session the new layout does not use; one the broker will not let us end (its
    ACL, after a change of login or client id) is left to its expiry, said once here."""
    try:
        _connect_once(cfg, client_id, deadline, keep=False)
    except BrokerError as exc:
        if "refused the connection" not in str(exc):
            raise
        log.warning("broker_session_not_ended", client_id=client_id, error=str(exc),
                    note="the broker keeps it until mqtt.session_expiry_s after its last use")


class _Session:
    """One connection as a client id, made synchronously (the handover runs before the
    daemon's own links): ``resume`` the session or start it clean; ``keep`` it after the
    disconnect (for ``mqtt.session_expiry_s`` with MQTT 5) or end it then. Raises
    BrokerError if the broker cannot be reached by ``deadline`` or refuses the connection."""

    def __init__(self, cfg: MqttConfig, client_id: str, deadline: Deadline, *, resume: bool,
                 keep: bool, on_message: Callable[[paho.MQTTMessage], None] | None = None
                 ) -> None:
        self.cfg, self.client_id = cfg, client_id
        v5 = cfg.protocol == "5"
        # Without ``on_message`` nothing delivered is taken, so nothing is acknowledged:
        # paho would acknowledge (and the broker drop) what a resumed session holds, such
        # as a bridge left by a handover cut short, in the moment this connection lasts.
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=None if v5 else not (resume or keep),
                             protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                             manual_ack=on_message is None)
        set_credentials(client, cfg)
        self.answered = threading.Event()
        self.refusal: str | None = None  # the last answer's failure, if it was one
        refused: list[str | None] = [None]

        def connected(c: paho.Client, userdata: Any, flags: Any, reason: Any,
                      props: Any) -> None:
            refused[0] = str(reason) if reason.is_failure else None
            self.answered.set()

        def answered(c: paho.Client, userdata: Any, mid: int, reasons: Any,
                     props: Any) -> None:
            codes = reasons if isinstance(reasons, list) else [reasons]
            self.refusal = next((str(r) for r in codes if r.is_failure), None)
            self.answered.set()

        client.on_connect = connected
        client.on_subscribe = answered
        client.on_unsubscribe = answered
        client.on_publish = answered
        if on_message is not None:
            client.on_message = lambda c, u, msg: on_message(msg)
        delay = cfg.reconnect_min_delay_s
        while True:
            try:
                if v5:
                    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    props.SessionExpiryInterval = cfg.session_expiry_s if keep else 0
                    client.connect(cfg.host, cfg.port, cfg.keepalive_s, clean_start=not resume,
                                   properties=props)
                else:
                    client.connect(cfg.host, cfg.port, cfg.keepalive_s)
                break
            except OSError as exc:  # ssl.SSLError included: retrying cannot mend a certificate
                if isinstance(exc, ssl.SSLError):
                    raise BrokerRefusedError(connect_failure(cfg, exc)) from exc
                if time.monotonic() + delay > deadline.at:
                    raise BrokerError(connect_failure(cfg, exc)) from exc
                log.warning("broker_unreachable", host=cfg.host, port=cfg.port, error=str(exc),
                            retry_in_s=delay)
                deadline.sleep(delay)
                delay = min(delay * 2, cfg.reconnect_max_delay_s)
        self.client = client
        client.loop_start()
        try:
            self.wait("CONNECT")
            if refused[0] is not None:
                raise refusal(refused[0], f"broker at {cfg.host}:{cfg.port} refused the "
                              f"connection as {client_id!r}: {refused[0]}")
        except BaseException:
            self.close()
            raise

    def wait(self, what: str) -> None:
        if not self.answered.wait(ANSWER_S):
            raise BrokerError(f"broker at {self.cfg.host}:{self.cfg.port}: no answer to "
                              f"{what} as {self.client_id!r} within {ANSWER_S:.0f}s")
        self.answered.clear()

    def close(self) -> None:
        self.client.disconnect()  # (MQTT 5: an unanswered one ends an expiry-0 session too)
        self.client.loop_stop()


def _connect_once(cfg: MqttConfig, client_id: str, deadline: Deadline, *, keep: bool,
                  subscription: str | None = None, resume: bool = False) -> None:
    """One connection as ``client_id``, with a clean start unless ``resume``: ``keep``
    False ends its session (and drops what it queued) at the disconnect; True leaves it,
    subscribed to ``subscription`` at QoS 1, for the broker to keep for
    ``mqtt.session_expiry_s``."""
    session = _Session(cfg, client_id, deadline, resume=resume, keep=keep)
    try:
        if subscription is not None:
            session.client.subscribe(subscription, qos=1)
            session.wait("SUBSCRIBE")
            # a refusal is the daemon's to report, at its own subscription (same filter)
    finally:
        session.close()


def _was_owned(settings: Settings, before: Record, cid: str) -> Callable[[str], bool]:
    """Whether the previous layout's session ``cid`` judged a reading on a topic: under
    device dispatch every session queued every reading and each worker judged its own
    devices' (the others are the other sessions' to hand over); else all of them."""
    if before.dispatch != "device" or len(before.sessions) < 2:
        return lambda topic: True
    ids = list(before.sessions)
    matcher = TopicMatcher(before.sessions[cid], settings.limits.device_id_pattern)
    return TopicOwnership(matcher, ids.index(cid), len(ids)).owns


def _drain(cfg: MqttConfig, olds: Sequence[tuple[str, str, Callable[[str], bool]]],
           deadline: Deadline, journal: spool.Journal, marker: str | None) -> None:
    """Take what sessions had queued: resume each of ``olds`` (client id, subscription,
    ``owned``), unsubscribe them all at once (nothing more joins; the new sessions exist
    already, so a reading published meanwhile is in both, never in neither), publish a
    ``marker`` behind what they queued and receive until it has come back to each (the
    broker delivers a session's messages in order). Where the broker refuses the marker,
    until nothing has come for ``QUIET_S``; where it was published but has not come back
    (dropped by a full queue), for ``MARKER_QUIET_S``; at most ``DRAIN_MAX_S`` in all.
    Each reading its session's worker would have judged (``owned(topic)``) goes to the
    ``journal`` before paho acknowledges it; a retained copy (sent at a subscription, not
    queued) is passed over."""
    if not olds:
        return
    heard = [time.monotonic()]
    token = os.urandom(8).hex().encode()  # not a marker a handover cut short left queued
    status = marker.rpartition(HANDOVER_LEVEL)[0] if marker is not None else None
    back: list[bool] = []
    failed: list[OSError] = []
    opened: list[_Session] = []

    def receiver(index: int, owned: Callable[[str], bool]
                 ) -> Callable[[paho.MQTTMessage], None]:
        def arrived(msg: paho.MQTTMessage) -> None:  # on paho's thread: must not raise
            heard[0] = time.monotonic()
            try:
                topic = msg.topic
            except UnicodeDecodeError:  # the decoder dead-letters it, as it would live
                topic = msg._topic.decode("utf-8", "replace")
            if topic == marker:
                back[index] = back[index] or msg.payload == token
            elif status is not None and is_marker(topic, status):
                pass  # one a handover killed after publishing it left in the session
            elif not msg.payload:
                pass  # a retained reading cleared: no reading (skipped live too)
            elif not msg.retain and owned(topic):
                try:
                    journal.add(spool.Queued(topic, bytes(msg.payload), time.time()))
                except OSError as exc:  # raised on: paho acknowledges nothing more
                    failed.append(exc)
                    raise
        return arrived

    try:
        subscribed: list[str] = []
        for client_id, subscription, owned in olds:
            try:
                opened.append(_Session(cfg, client_id, deadline, resume=True, keep=True,
                                       on_message=receiver(len(back), owned)))
            except BrokerError as exc:
                if "refused the connection" not in str(exc):
                    raise
                log.warning("broker_session_not_drained", client_id=client_id,
                            error=str(exc), note="what it queued is not judged")
                continue
            back.append(False)
            subscribed.append(subscription)
        if marker is not None:
            marker = _subscribe_marker(opened, marker)
        for session, subscription in zip(opened, subscribed, strict=True):
            session.client.unsubscribe(subscription)
        for session in opened:
            session.wait("UNSUBSCRIBE")
        if marker is not None and opened:
            marker = _publish_marker(opened[0], marker, token)
        heard[0] = time.monotonic()
        limit = time.monotonic() + DRAIN_MAX_S
        quiet = QUIET_S if marker is None else MARKER_QUIET_S
        while not (marker is not None and all(back)):
            if failed:  # the state directory (full?): the sessions stay for the next start
                raise failed[0]
            if time.monotonic() - heard[0] >= quiet:
                if marker is not None:
                    log.warning("handover_marker_not_back", client_ids=[
                        s.client_id for s, b in zip(opened, back, strict=True) if not b],
                        quiet_s=quiet, note="taken as drained: the broker may have dropped "
                        "the marker (its queue for the session full), or the ACL its copy")
                break
            if time.monotonic() > limit:
                log.warning("broker_sessions_not_drained", client_ids=[c for c, _, _ in olds],
                            taken=journal.count, note=f"still receiving after "
                            f"{DRAIN_MAX_S:.0f}s: the rest of what they queued goes with them")
                break
            time.sleep(0.02)
    finally:
        for session in opened:
            session.close()


def _subscribe_marker(opened: Sequence[_Session], marker: str) -> str | None:
    """Subscribe each session to the ``marker`` topic; None if the broker refuses one."""
    for session in opened:
        session.client.subscribe(marker, qos=1)
        session.wait("SUBSCRIBE")
        if session.refusal is not None:
            log.info("handover_marker_refused", client_id=session.client_id, topic=marker,
                     error=session.refusal, note=f"the drain ends after {QUIET_S}s without "
                     f"a reading instead; allow the daemon to subscribe to its status topic's "
                     f"subtopics for a certain end")
            return None
    return marker


def _publish_marker(session: _Session, marker: str, token: bytes) -> str | None:
    """Publish the marker behind every session's backlog; None if the broker refuses it."""
    session.client.publish(marker, token, qos=1)
    session.wait("PUBLISH")
    if session.refusal is not None:
        log.info("handover_marker_refused", client_id=session.client_id, topic=marker,
                 error=session.refusal, note=f"the drain ends after {QUIET_S}s without a "
                 f"reading instead")
        return None
    return marker
