"""Acknowledge received messages in arrival order, only once all their outputs are safe.

A received QoS 1 message is acknowledged to the broker only after every verdict, alert or
dead-letter record it caused has itself been acknowledged by the broker: until then the
broker still holds the reading and redelivers it if anomalyd dies. MQTT requires PUBACKs in
the order the PUBLISHes arrived, so a finished message waits for every earlier one.

Pure bookkeeping: the function that sends an acknowledgement is passed in.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class Inbound:
    """One message received on the readings subscription."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: float  # time.monotonic() at receipt
    received_wall: float  # time.time() at receipt
    epoch: int = 0
    holds: int = 1  # 1 for "not yet processed" + 1 per output awaiting the broker's ack
    done: bool = field(default=False)


class AckSequencer:
    """Tracks holds on received messages and sends their acks in arrival order.

    ``send_ack(mid)`` is called with the sequencer's lock held, so acknowledgements leave
    in order even when outputs are confirmed from several threads.
    """

    def __init__(
        self,
        send_ack: Callable[[int], None],
        on_done: Callable[[Inbound], None] | None = None,
    ) -> None:
        self._send_ack = send_ack
        self._on_done = on_done
        self._lock = threading.Lock()
        self._queue: deque[Inbound] = deque()
        self._epoch = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        return len(self._queue)

    def register(self, msg: Inbound) -> None:
        """Record a newly received message (call in arrival order)."""
        with self._lock:
            msg.epoch = self._epoch
            if msg.qos > 0:
                self._queue.append(msg)

    def hold(self, msg: Inbound) -> None:
        """One more output now waits on the broker for this message."""
        with self._lock:
            msg.holds += 1

    def release(self, msg: Inbound) -> None:
        """One hold on ``msg`` is over; ack every finished message at the head."""
        with self._lock:
            msg.holds -= 1
            if msg.holds > 0:
                return
            msg.done = True
            if self._on_done is not None:
                self._on_done(msg)
            self._ack_finished_head()

    def pass_over(self, msg: Inbound) -> None:
        """A registered message that is not ours to process (another worker's device):
        acknowledge it in its turn, without counting it as a finished reading."""
        with self._lock:
            msg.holds = 0
            msg.done = True
            self._ack_finished_head()

    def forget(self, msg: Inbound) -> None:
        """Drop a message that will not be processed; it stays unacked at the broker.

        The broker resends it only on the next connection, so this is for messages that
        could not be handed over at all (an exception in the intake), never for load.
        """
        with self._lock:
            try:
                self._queue.remove(msg)
            except ValueError:
                return
            self._ack_finished_head()

    def _ack_finished_head(self) -> None:
        queue = self._queue
        while queue and queue[0].done:
            self._send_ack(queue.popleft().mid)

    def new_session(self) -> int:
        """The connection was lost: forget unacked messages of the old connection.

        Their packet ids mean nothing on the next connection, and the broker redelivers
        every unacknowledged message of a persistent session, so acking them later could
        acknowledge a different message. They are still scored (a duplicate verdict within
        the documented redelivery window), never acked.
        """
        with self._lock:
            self._queue.clear()
            self._epoch += 1
            return self._epoch
