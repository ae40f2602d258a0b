"""Ordered acknowledgement: a reading is acked only after its outputs, and in arrival order."""

from __future__ import annotations

import random
import threading

from daemon.acks import AckSequencer, Inbound


def msg(mid: int, qos: int = 1) -> Inbound:
    return Inbound(mid=mid, qos=qos, topic="t", payload=b"", received_at=0.0, received_wall=0.0)


def test_ack_waits_for_every_output_of_the_message() -> None:
    sent: list[int] = []
    seq = AckSequencer(sent.append)
    m = msg(1)
    seq.register(m)
    seq.hold(m)  # verdict published
    seq.hold(m)  # alert published
    seq.release(m)  # processing finished
    seq.release(m)  # verdict acked by the broker
    assert sent == []
    seq.release(m)  # alert acked
    assert sent == [1]


def test_acks_leave_in_arrival_order_even_when_finished_out_of_order() -> None:
    sent: list[int] = []
    seq = AckSequencer(sent.append)
    a, b, c = msg(1), msg(2), msg(3)
    for m in (a, b, c):
        seq.register(m)
    seq.release(c)
    seq.release(b)
    assert sent == []
    seq.release(a)
    assert sent == [1, 2, 3]


def test_qos0_messages_are_never_acked_and_never_block() -> None:
    sent: list[int] = []
    seq = AckSequencer(sent.append)
    z, one = msg(0, qos=0), msg(7)
    seq.register(z)
    seq.register(one)
    seq.release(one)
    assert sent == [7]
    seq.release(z)
    assert sent == [7]


def test_new_session_drops_old_packet_ids_without_acking_them() -> None:
    sent: list[int] = []
    seq = AckSequencer(sent.append)
    old = msg(5)
    seq.register(old)
    seq.new_session()
    new = msg(5)  # the broker redelivers with the same packet id
    seq.register(new)
    seq.release(old)
    assert sent == []
    seq.release(new)
    assert sent == [5]


def test_forget_unblocks_later_messages_without_acking_the_forgotten_one() -> None:
    sent: list[int] = []
    seq = AckSequencer(sent.append)
    a, b = msg(1), msg(2)
    seq.register(a)
    seq.register(b)
    seq.release(b)
    seq.forget(a)
    assert sent == [2]


def test_on_done_reports_each_message_once() -> None:
    done: list[int] = []
    seq = AckSequencer(lambda mid: None, lambda m: done.append(m.mid))
    a = msg(1)
    seq.register(a)
    seq.hold(a)
    seq.release(a)
    seq.release(a)
    assert done == [1]


def test_concurrent_releases_keep_arrival_order() -> None:
    sent: list[int] = []
    seq = AckSequencer(sent.append)
    msgs = [msg(i) for i in range(1, 2001)]
    for m in msgs:
        seq.register(m)
        seq.hold(m)
    order = msgs[:]
    random.Random(1).shuffle(order)
    halves = [order[::2], order[1::2]]

    def worker(part: list[Inbound]) -> None:
        for m in part:
            seq.release(m)
            seq.release(m)

    threads = [threading.Thread(target=worker, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sent == list(range(1, 2001))
