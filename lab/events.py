"""one_hm's ZeroMQ PUB socket: every host and VM state change, in both key forms (REFERENCE §2).

The model calls `publish` under its lock; the message is rendered there (so it carries the state of that moment)
and queued. One thread owns the socket and sends, because zmq sockets are not thread-safe.
"""

from __future__ import annotations

import base64
import queue
import random
import threading

import zmq

from oneha.lab import xmlwriter

_STOP = (b"", b"")


class EventPublisher:
    def __init__(self, bind: str = "127.0.0.1", port: int = 2101, seed: int = 0) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        if port == 0:
            self.port = self.socket.bind_to_random_port(f"tcp://{bind}")
        else:
            self.socket.bind(f"tcp://{bind}:{port}")
            self.port = port
        self.url = f"tcp://{bind}:{self.port}"
        self.drop_rate = 0.0
        self.sent = 0
        self.dropped = 0
        self._rng = random.Random(seed)  # noqa: S311 - simulation, not security
        self._queue: queue.SimpleQueue[tuple[bytes, bytes]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lab-events", daemon=True)
        self._thread.start()

    def publish(self, kind: str, oid: int, state: str, lcm: str | None, remote_host: str | None,
                body: str) -> None:
        """Queue one state change as oned's two messages (the STATE key form and the object key form)."""
        if self.drop_rate > 0 and self._rng.random() < self.drop_rate:
            self.dropped += 1  # the whole change is lost, as when a subscriber misses it
            return
        doc = xmlwriter.hook_message(kind, oid, state, lcm, remote_host, body)
        content = base64.b64encode(doc.encode("utf-8"))  # one line: b64encode never inserts line breaks
        for key in keys(kind, oid, state, lcm):
            self._queue.put((key, content))

    def _run(self) -> None:
        while True:
            key, content = self._queue.get()
            if (key, content) == _STOP:
                return
            self.socket.send_multipart([key, content])
            self.sent += 1

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=5)
        self.socket.close(linger=0)


def keys(kind: str, oid: int, state: str, lcm: str | None) -> list[bytes]:
    """Both key forms, each with oned's trailing space."""
    if kind == "HOST":
        return [f"EVENT STATE HOST/{state}//{oid} ".encode(), f"EVENT HOST {oid}/{state}/ ".encode()]
    lcm = lcm or "LCM_INIT"
    return [f"EVENT STATE VM/{state}/{lcm}/{oid} ".encode(), f"EVENT VM {oid}/{state}/{lcm} ".encode()]
