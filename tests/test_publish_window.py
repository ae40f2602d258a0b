"""The cap on unacknowledged publishes: early PUBACKs, the broker's Receive Maximum."""

from __future__ import annotations

import threading

from daemon.acks import Inbound
from daemon.mqtt import ACKED, PENDING, PublishWindow


def owner() -> Inbound:
    return Inbound(mid=1, qos=1, topic="t", payload=b"", received_at=0.0, received_wall=0.0)


def test_acquire_blocks_at_the_limit_until_an_ack_frees_a_slot() -> None:
    w = PublishWindow(2)
    assert w.acquire(0) and w.acquire(0)
    assert w.record(10, None) == PENDING
    w.record(11, None)
    assert not w.acquire(0.01)
    assert w.acked(10) == (True, None, 0)
    assert w.acquire(0)


def test_an_ack_that_arrives_before_the_id_is_recorded_is_not_lost() -> None:
    w = PublishWindow(1)
    o = owner()
    assert w.acquire(0)
    assert w.acked(7) == (False, None, 0)  # the network thread was faster
    assert w.record(7, o) == ACKED  # recorded late: already acknowledged, slot freed
    assert len(w) == 0
    assert w.acquire(0)


def test_broker_receive_maximum_lowers_but_never_raises_the_limit() -> None:
    w = PublishWindow(100)
    w.set_limit(20)
    assert w.limit == 20
    w.set_limit(65535)
    assert w.limit == 100


def test_raising_the_limit_wakes_a_waiting_publisher() -> None:
    w = PublishWindow(10)
    w.set_limit(1)
    assert w.acquire(0)
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(w.acquire(5)))
    t.start()
    w.set_limit(2)
    t.join(5)
    assert got == [True]


def test_uncounted_publishes_take_no_slot() -> None:
    w = PublishWindow(1)
    w.record(3, None, counted=False)
    assert w.acquire(0)  # the status message did not use the only slot
    assert w.acked(3) == (True, None, 0)
    assert not w.acquire(0)  # and its ack did not free a slot it never took


def test_a_refused_publish_keeps_its_slot_and_what_to_publish_again() -> None:
    w = PublishWindow(1)
    o = owner()
    assert w.acquire(0)
    w.record(5, o, message=("anomaly/p/alert", b"{}", True))
    assert w.refused(5, "Not authorized") == (o, ("anomaly/p/alert", b"{}", True), 0)
    assert len(w) == 0 and not w.acquire(0)  # not at the broker: the slot stays taken
    # published again (its second attempt), and accepted: the slot is free
    w.record(6, o, message=("anomaly/p/alert", b"{}", True), attempt=1)
    assert w.acked(6) == (True, o, 1)
    assert w.acquire(0)


def test_a_refusal_that_arrives_before_the_id_is_recorded_is_not_lost() -> None:
    w = PublishWindow(1)
    assert w.acquire(0)
    assert w.refused(9, "Quota exceeded") is None  # the network thread was faster
    assert w.record(9, owner(), message=("t", b"", False)) == "Quota exceeded"
    assert not w.acquire(0)  # kept for the retry
