"""Which readings a device has sent before: a sliding window over its ``seq`` values.

A reading whose ``seq`` its device already sent (a broker's redelivery after a lost
acknowledgement, or the device's own resend) is judged again but must not be learnt twice
(``daemon.devices``). Each device keeps the highest ``seq`` seen and a bit mask of which of
the ``REPEAT_SPAN`` values below it were seen, as in replay protection (two integers a
device, whatever its rate). A late reading inside the window that was never seen is new
(and marked); a ``seq`` far below the window starts it anew (a device that restarted and
counts from 0 again); one far above slides it. A seq value that leaves the window never
seen, or that the device's count jumped past, is a reading it numbered that never arrived:
lost on the way (a device's buffer, a QoS 0 hop, a broker's full queue); those are
counted (``missing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: How many sequence numbers below a device's highest one are remembered.
REPEAT_SPAN = 64
_SPAN_MASK = (1 << REPEAT_SPAN) - 1
#: A device's seq jumping ahead by more than this is taken as numbering anew (a new
#: counter, a seq that is not a count), not as that many readings lost.
MAX_GAP = 1_000_000


@dataclass(slots=True)
class SeqWindow:
    last: int | None = None  # the highest seq seen
    mask: int = 0  # bit k: seq ``last - k`` was seen
    #: how many positions of the mask stand for seq values since the count (re)started:
    #: the bits above are no readings at all, not missing ones
    depth: int = 0
    #: seq values that left the window (or were skipped past it) never seen: readings the
    #: device numbered that did not arrive (see ``seen``)
    missing: int = 0

    def known(self, seq: int) -> bool:
        """Whether ``seq`` was seen before, remembering nothing."""
        last = self.last
        if last is None or seq > last or last - seq >= REPEAT_SPAN:
            return False
        return bool(self.mask & (1 << (last - seq)))

    def seen(self, seq: int) -> bool:
        """Whether ``seq`` was seen before; if not, it is now.

        A seq value below the highest that was never seen may still arrive while it is
        within the window (a late reading); once it leaves the window unseen, or is jumped
        past altogether, it is counted in ``missing``.
        """
        last = self.last
        if last is not None and seq == last + 1 and self.depth == REPEAT_SPAN:
            # the usual step of a device counting one by one: one position leaves
            mask = self.mask
            self.missing += 1 - (mask >> (REPEAT_SPAN - 1))
            self.mask = ((mask << 1) | 1) & _SPAN_MASK
            self.last = seq
            return False
        if last is None or seq > last or last - seq >= REPEAT_SPAN:
            shift = 0 if last is None else seq - last
            if last is None or seq < last or shift > MAX_GAP:
                # the first, far below (a restarted count) or far above (a count started
                # anew elsewhere): the window and the count of missing ones start again
                self.mask, self.depth, self.last = 1, 1, seq
                return False
            depth = self.depth
            self.missing += self._leaving(shift)
            # shift only inside the window: seq may jump by up to 2**63, and a bigger
            # shift would build an integer of that many bits
            self.mask = ((self.mask << shift) | 1) & _SPAN_MASK if shift < REPEAT_SPAN else 1
            self.depth = min(REPEAT_SPAN, depth + shift)
            self.last = seq
            return False
        bit = 1 << (last - seq)
        if self.mask & bit:
            return True
        self.mask |= bit
        return False

    def _leaving(self, shift: int) -> int:
        """Unseen seq values that a move of the highest one by ``shift`` pushes out of the
        window, and those it jumps past without their ever being in it."""
        lo = max(0, REPEAT_SPAN - shift)  # positions from here up leave the window
        out = max(0, self.depth - lo)
        unseen = out - ((self.mask >> lo) & ((1 << out) - 1)).bit_count() if out else 0
        return unseen + max(0, shift - REPEAT_SPAN)

    def to_json(self) -> dict[str, Any]:
        return {"last_seq": self.last, "seq_mask": self.mask, "seq_depth": self.depth,
                "seq_missing": self.missing}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SeqWindow:
        """From ``to_json``'s keys; state saved before they existed has none (empty), and
        state saved before ``depth`` and ``missing`` takes the depth from the mask."""
        last, mask = raw.get("last_seq"), raw.get("seq_mask", 0)
        if last is None:
            return cls()
        if type(last) is not int or type(mask) is not int or not 0 <= mask <= _SPAN_MASK:
            raise ValueError("device state has an invalid seq window")
        depth, missing = raw.get("seq_depth", mask.bit_length()), raw.get("seq_missing", 0)
        if (type(depth) is not int or not mask.bit_length() <= depth <= REPEAT_SPAN
                or type(missing) is not int or missing < 0):
            raise ValueError("device state has an invalid seq window")
        return cls(last, mask, depth, missing)
