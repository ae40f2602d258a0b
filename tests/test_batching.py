"""Micro-batching never holds a lone reading back and takes what queued meanwhile."""

from __future__ import annotations

import queue
import time

from daemon.batching import next_batch


def test_lone_item_is_returned_at_once_even_with_a_long_wait_bound() -> None:
    q: queue.Queue[int] = queue.Queue()
    q.put(1)
    t0 = time.monotonic()
    assert next_batch(q, max_size=100, max_wait_s=5.0) == [1]
    assert time.monotonic() - t0 < 1.0  # far below the 5 s wait bound


def test_queued_items_join_the_batch_up_to_max_size() -> None:
    q: queue.Queue[int] = queue.Queue()
    for i in range(10):
        q.put(i)
    assert next_batch(q, max_size=4, max_wait_s=1.0) == [0, 1, 2, 3]
    assert next_batch(q, max_size=100, max_wait_s=1.0) == [4, 5, 6, 7, 8, 9]


def test_empty_queue_returns_empty_list_after_poll() -> None:
    q: queue.Queue[int] = queue.Queue()
    assert next_batch(q, max_size=10, max_wait_s=0.0, poll_s=0.01) == []


def test_wait_bound_cuts_a_long_drain() -> None:
    q: queue.Queue[int] = queue.Queue()
    for i in range(1000):
        q.put(i)
    batch = next_batch(q, max_size=1000, max_wait_s=0.0)
    # With a zero wait bound the drain stops at the first time check.
    assert len(batch) == 64


def test_simple_queue_drains_the_same_way() -> None:
    q: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(5):
        q.put(i)
    assert next_batch(q, max_size=3, max_wait_s=1.0) == [0, 1, 2]
    assert next_batch(q, max_size=3, max_wait_s=1.0) == [3, 4]
    assert next_batch(q, max_size=3, max_wait_s=1.0, poll_s=0.01) == []


def test_weight_bound_cuts_the_batch_but_always_takes_one() -> None:
    q: queue.Queue[bytes] = queue.Queue()
    for size in (600, 600, 600, 10):
        q.put(b"x" * size)
    batch = next_batch(q, max_size=100, max_wait_s=1.0, weight=len, max_weight=1000)
    assert [len(b) for b in batch] == [600, 600]  # cut once 1,000 bytes were reached
    q2: queue.Queue[bytes] = queue.Queue()
    q2.put(b"x" * 5000)
    assert len(next_batch(q2, max_size=100, max_wait_s=1.0, weight=len, max_weight=1000)) == 1
