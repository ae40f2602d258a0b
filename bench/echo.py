"""The reference: a bare paho echo, QoS 1 in and out, nothing decoded or scored.

Subscribes to the readings like the daemon (v5, Receive Maximum 1000, TCP_NODELAY, 1,000
outgoing in flight) and republishes each payload unchanged on ``echo/<topic>``. paho acks
each input when ``on_message`` returns. Exits on SIGTERM or after ``--max-time``.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from bench._client import connect


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ready", type=Path, required=True)
    p.add_argument("--max-time", type=float, default=600.0)
    args = p.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    client = connect(args.port, "bench-echo", receive_maximum=1000,
                     subscribe=["sensors/+/readings"])

    def on_message(c: Any, u: Any, msg: Any) -> None:
        c.publish("echo/" + msg.topic, msg.payload, qos=1)

    client.on_message = on_message
    args.ready.write_text("ok")
    stop.wait(args.max_time)
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
