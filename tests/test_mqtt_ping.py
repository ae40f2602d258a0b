"""The watchdog's PINGREQ, sent from its own thread while paho's network thread may
handle the PINGRESP at any moment."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from daemon.mqtt_link import ping


def _client_whose_answer_comes_at_once() -> paho.Client:
    """A client whose PINGREQ is answered, and the answer handled, as soon as it is
    queued: what the network thread may do before the sending thread runs again."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="ping-test")

    def send(command: Any) -> Any:
        assert command == paho.PINGREQ
        client._ping_t = 0  # paho's PINGRESP handler
        return paho.MQTT_ERR_SUCCESS

    client._send_simple_command = send  # type: ignore[method-assign]
    return client


def test_an_answer_handled_before_the_sender_runs_again_is_not_lost() -> None:
    client = _client_whose_answer_comes_at_once()
    ping(client)
    assert client._ping_t == 0  # answered: not taken for a silent broker


def test_a_ping_that_could_not_be_sent_is_not_waited_for() -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="ping-test")  # not connected
    ping(client)
    assert client._ping_t == 0
