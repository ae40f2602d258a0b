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
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def next_batch(
    source: queue.Queue[T] | queue.SimpleQueue[T],
    max_size: int,
    max_wait_s: float,
    poll_s: float = 0.1,
    weight: Callable[[T], int] | None = None,
    max_weight: int = 0,
) -> list[T]:
    """Block up to ``poll_s`` for a first item, then drain what is already queued.

    With ``weight``, the batch is also cut once the items' total weight reaches
    ``max_weight`` (the daemon weighs messages by payload bytes, so a burst of large batch
    messages cannot make one enormous scoring call). Returns an empty list when nothing
    arrived within ``poll_s`` (so the caller can check for shutdown).
    """
    try:
        first = source.get(timeout=poll_s)
    except queue.Empty:
        return []
    batch = [first]
    total = weight(first) if weight is not None else 0
    deadline = time.monotonic() + max_wait_s
    get = source.get_nowait
    while len(batch) < max_size and (weight is None or total < max_weight):
        try:
            item = get()
        except queue.Empty:
            break
        batch.append(item)
        if weight is not None:
            total += weight(item)
        if len(batch) % 64 == 0 and time.monotonic() >= deadline:
            break
    return batch
