"""Which device a topic belongs to, under the daemon's MQTT subscription filter.

The device id is the topic level under the filter's ``+``; a shared subscription's
``$share/<group>/`` prefix is not part of the topics that arrive. Ids must also match the
configured pattern. Pure, and cached: devices publish on the same few topics again and
again.
"""

from __future__ import annotations

import re

from daemon.errors import ConfigError

MAX_TOPIC_LEN = 65_535  # the MQTT limit; longer strings cannot be real topics
TOPIC_CACHE_SIZE = 4096
MAX_CACHED_TOPIC_LEN = 256


class TopicMatcher:
    def __init__(self, subscription: str, device_id_pattern: str) -> None:
        self._levels, self._id_level, self._multi = parse_filter(subscription)
        try:
            self._id_pattern = re.compile(device_id_pattern)
        except re.error as exc:
            raise ConfigError(f"device_id_pattern does not compile: {exc}") from exc
        # Bounded: cleared when full, short topics only.
        self._cache: dict[str, str | None] = {}

    def device_id(self, topic: str) -> str | None:
        """The device id in `topic`, or None if the topic does not fit the subscription."""
        cache = self._cache
        if topic in cache:
            return cache[topic]
        device_id = self._parse_topic(topic)
        if len(topic) <= MAX_CACHED_TOPIC_LEN:
            if len(cache) >= TOPIC_CACHE_SIZE:
                cache.clear()
            cache[topic] = device_id
        return device_id

    @property
    def id_pattern(self) -> str:
        return self._id_pattern.pattern

    def id_level(self, topic: str) -> str | None:
        """The text of `topic` at the filter's ``+`` level, valid id or not; None if the
        topic does not fit the filter (says why `device_id` refused a topic)."""
        if len(topic) > MAX_TOPIC_LEN or "+" in topic or "#" in topic:
            return None
        levels = topic.split("/")
        pattern = self._levels
        if len(levels) != len(pattern) and not (self._multi and len(levels) >= len(pattern)):
            return None
        # MQTT: a filter starting with a wildcard does not match topics starting with "$".
        if pattern[0] == "+" and topic.startswith("$"):
            return None
        for want, got in zip(pattern, levels, strict=False):
            if want != "+" and want != got:
                return None
        return levels[self._id_level]

    def _parse_topic(self, topic: str) -> str | None:
        candidate = self.id_level(topic)
        if candidate is None or not self._id_pattern.fullmatch(candidate):
            return None
        return candidate


def unshared(subscription: str) -> str:
    """The filter itself: a shared subscription (``$share/<group>/<filter>``) without its
    prefix ("" if it has no filter)."""
    if subscription.startswith("$share/"):
        return subscription.split("/", 2)[2] if subscription.count("/") >= 2 else ""
    return subscription


def parse_filter(subscription: str) -> tuple[tuple[str, ...], int, bool]:
    """Split an MQTT filter into levels: (levels without '#', id level index, has '#')."""
    if subscription.startswith("$share/") and (
            subscription.count("/") < 2 or not subscription.split("/", 2)[1]):
        raise ConfigError(f"subscription {subscription!r}: '$share/' needs a group name")
    levels = unshared(subscription).split("/")
    multi = levels[-1] == "#"
    if multi:
        levels.pop()
    for level in levels:
        if level != "+" and ("+" in level or "#" in level):
            raise ConfigError(f"subscription {subscription!r}: misplaced wildcard")
    if "+" not in levels:
        raise ConfigError(f"subscription {subscription!r} needs a '+' level for the device id")
    return tuple(levels), levels.index("+"), multi


#: The level under the status topic of a handover's markers (``daemon.sessions``).
HANDOVER_LEVEL = "/handover/"


def marker_topic(status: str, token: str) -> str:
    """The topic of a handover's marker: ``<status>/handover/<8 hex digits>``."""
    return f"{status}{HANDOVER_LEVEL}{token}"


def is_marker(topic: str, status: str) -> bool:
    """Whether ``topic`` is a handover marker's (that exact shape: a reading or result
    merely under ``<status>/handover/`` is not)."""
    return re.fullmatch(re.escape(status + HANDOVER_LEVEL) + "[0-9a-f]{8}", topic) is not None


def could_match(subscription: str, template: str, device_id_pattern: str) -> bool:
    """Whether the filter ``subscription`` matches a topic ``template`` gives for some
    device id (``{device_id}``, any id ``device_id_pattern`` allows, stands for one level
    or part of one). A daemon whose subscription matches its own result topics reads its
    results as readings: each one dead-lettered, the dead letters too, in a loop."""
    levels, _, multi = parse_filter(subscription)
    topic = template.split("/")
    if len(topic) < len(levels) or (len(topic) > len(levels) and not multi):
        return False
    if levels[0] == "+" and template.startswith("$"):
        return False
    ids = re.compile(device_id_pattern)
    return all(want == "+" or _level_fits(got, want, ids)
               for want, got in zip(levels, topic, strict=False))


def templates_overlap(a: str, b: str, device_id_pattern: str) -> bool:
    """Whether two result topic templates give the same topic for some device ids (the
    verdict of a device called ``status`` on the status topic, say)."""
    left, right = a.split("/"), b.split("/")
    if len(left) != len(right):
        return False
    ids = re.compile(device_id_pattern)
    for x, y in zip(left, right, strict=True):
        if "{device_id}" in x and "{device_id}" in y:
            # two ids: the literal parts around them must agree, and where one template
            # has more of them (``alert-{device_id}`` beside ``{device_id}``) the other's
            # id must be able to hold that text
            (xb, _, xa), (yb, _, ya) = x.partition("{device_id}"), y.partition("{device_id}")
            if not (xb.startswith(yb) or yb.startswith(xb)) or not (
                    xa.endswith(ya) or ya.endswith(xa)):
                return False
            before = xb[len(yb):] or yb[len(xb):]
            after = xa[:max(0, len(xa) - len(ya))] or ya[:max(0, len(ya) - len(xa))]
            if (before or after) and not any(ids.fullmatch(before + probe + after)
                                             for probe in _PROBES):
                return False
        elif not (_level_fits(x, y, ids) if "{device_id}" in x else _level_fits(y, x, ids)):
            return False
    return True


#: Id middles tried where one template's id would have to hold the other's extra text
#: (``templates_overlap``): a pattern that takes none of them is taken to allow no such id.
_PROBES = ("1", "a", "A", "01", "ab", "a1", "001", "abc", "x-1")


def _level_fits(level: str, text: str, ids: re.Pattern[str]) -> bool:
    """Whether a template's ``level`` (``{device_id}`` in it standing for an id ``ids``
    allows) can be the literal level ``text``."""
    if "{device_id}" not in level:
        return level == text
    before, _, after = level.partition("{device_id}")
    middle = len(text) - len(before) - len(after)
    return (middle >= 0 and text.startswith(before) and text.endswith(after)
            and ids.fullmatch(text[len(before):len(text) - len(after)]) is not None)
