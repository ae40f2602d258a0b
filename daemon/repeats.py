"""Which readings a device has sent before: a sliding window over its ``seq`` values.

A reading whose ``seq`` its device already sent (a broker's redelivery after a lost
acknowledgement, or the device's own resend) is judged again but must not be learnt twice
(``daemon.devices``). Each device keeps the highest ``seq`` seen and a bit mask of which of
the ``REPEAT_SPAN`` values below it were seen, as in replay protection (two integers a
device, whatever its rate). A late reading inside the window that was never seen is new
(and marked); a ``seq`` far below the window starts it anew (a device that restarted and
counts from 0 again); one far above slides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: How many sequence numbers below a device's highest one are remembered.
REPEAT_SPAN = 64
_SPAN_MASK = (1 << REPEAT_SPAN) - 1


@dataclass(slots=True)
class SeqWindow:
    last: int | None = None  # the highest seq seen
    mask: int = 0  # bit k: seq ``last - k`` was seen

    def known(self, seq: int) -> bool:
        """Whether ``seq`` was seen before, remembering nothing."""
        last = self.last
        if last is None or seq > last or last - seq >= REPEAT_SPAN:
            return False
        return bool(self.mask & (1 << (last - seq)))

    def seen(self, seq: int) -> bool:
        """Whether ``seq`` was seen before; if not, it is now."""
        last = self.last
        if last is None or seq > last or last - seq >= REPEAT_SPAN:
            shift = 0 if last is None or seq < last else seq - last
            # shift only inside the window: seq may jump by up to 2**63, and a bigger
            # shift would build an integer of that many bits
            if 0 < shift < REPEAT_SPAN:
                self.mask = ((self.mask << shift) | 1) & _SPAN_MASK
            else:
                self.mask = 1
            self.last = seq
            return False
        bit = 1 << (last - seq)
        if self.mask & bit:
            return True
        self.mask |= bit
        return False

    def to_json(self) -> dict[str, Any]:
        return {"last_seq": self.last, "seq_mask": self.mask}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SeqWindow:
        """From ``to_json``'s keys; state saved before they existed has none (empty)."""
        last, mask = raw.get("last_seq"), raw.get("seq_mask", 0)
        if last is None:
            return cls()
        if type(last) is not int or type(mask) is not int or not 0 <= mask <= _SPAN_MASK:
            raise ValueError("device state has an invalid seq window")
        return cls(last, mask)
