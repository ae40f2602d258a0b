"""Micro-batching: take what has queued while the scorer was busy, never wait for company.

The first message is taken as soon as it arrives, so a lone reading on an idle daemon is
scored at once. Whatever queued meanwhile joins it, up to ``max_size`` messages or until
``max_wait_s`` has passed since the first was taken, whichever comes first: under load,
batches grow by themselves, and the wait bound keeps a continuous trickle from holding the
first reading back.
"""

from __future__ import annotations

import queue
import time
from typing import TypeVar

T = TypeVar("T")


def next_batch(
    source: queue.Queue[T] | queue.SimpleQueue[T],
    max_size: int,
    max_wait_s: float,
    poll_s: float = 0.1,
) -> list[T]:
    """Block up to ``poll_s`` for a first item, then drain what is already queued.

    Returns an empty list when nothing arrived within ``poll_s`` (so the caller can
    check for shutdown).
    """
    try:
        first = source.get(timeout=poll_s)
    except queue.Empty:
        return []
    batch = [first]
    deadline = time.monotonic() + max_wait_s
    get = source.get_nowait
    while len(batch) < max_size:
        try:
            batch.append(get())
        except queue.Empty:
            break
        if len(batch) % 64 == 0 and time.monotonic() >= deadline:
            break
    return batch
