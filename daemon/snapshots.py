"""Per-device state saved a device at a time: a mapping whose entries are made when read.

Taking the whole fleet's state at once, on the scoring thread, held verdicts up: ~70 ms
to copy the windows, baselines and alert states of 10,000 devices with baselines
(``bench.state_save``, BENCHMARKS.md, "The state file saved a device at a time"). The state
writer (``daemon.state.StateWriter``) encodes a snapshot an entry at a time between
micro-batches on that same thread, so a device's entry is made at its turn instead, and
the copy it takes keeps it as it was then even if a micro-batch runs before its bytes are
written out. Each device is saved whole, as it was at its turn; the devices are not saved
at one instant, and none needs to be: a device's window, baseline and alert state are its
own. A device forgotten before its turn is left out, and one first seen after the
snapshot waits for the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Deferred(Mapping[str, dict[str, Any]], Generic[T]):
    """The entries of ``source`` (devices known now), each made by ``make`` when read."""

    __slots__ = ("_ids", "_make", "_source")

    def __init__(self, source: Mapping[str, T], make: Callable[[T], dict[str, Any]]) -> None:
        self._source = source
        self._ids = list(source)
        self._make = make

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self._make(self._source[key])

    def __iter__(self) -> Iterator[str]:
        source = self._source
        return (key for key in self._ids if key in source)

    def __len__(self) -> int:
        return sum(1 for _ in self)
