"""one_hm's ZeroMQ PUB socket: every host and VM state change, in both key forms (REFERENCE §2).

Order as oned's driver (`src/hm_mad/one_hm.rb`): the object key (`EVENT HOST 3/ERROR/ `) first, then the state key.
oned's hook manager runs the driver with several threads (15 by default), so changes of different objects may reach
subscribers out of order: `reorder_rate` (lab.faults event_reorder_rate) holds a change back until the next change
of another object has been sent, to show that oneha does not depend on order.

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
        self.reorder_rate = 0.0
        self.reordered = 0
        self._held: tuple[tuple[str, int], list[bytes], bytes] | None = None
        self._held_lock = threading.Lock()
        self.sent = 0
        self.dropped = 0
        self._rng = random.Random(seed)  # noqa: S311 - simulation, not security
        self._queue: queue.SimpleQueue[tuple[bytes, bytes]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lab-events", daemon=True)
        self._thread.start()

    def publish(self, kind: str, oid: int, state: str, lcm: str | None, remote_host: str | None,
                body: str, service_id: str | None = None) -> None:
        """Queue one state change as oned's two messages (the STATE key form and the object key form)."""
        if self.drop_rate > 0 and self._rng.random() < self.drop_rate:
            self.dropped += 1  # the whole change is lost, as when a subscriber misses it
            return
        doc = xmlwriter.hook_message(kind, oid, state, lcm, remote_host, body, service_id)
        content = base64.b64encode(doc.encode("utf-8"))  # one line: b64encode never inserts line breaks
        frames = keys(kind, oid, state, lcm)
        if service_id:  # a VM of a OneFlow service: one_hm.rb adds `EVENT SERVICE <id> `
            frames.append(f"EVENT SERVICE {service_id} ".encode())
        change = ((kind, oid), frames, content)
        with self._held_lock:
            held, self._held = self._held, None
            if held is not None and held[0] == change[0]:
                self._put(held)  # the same object's changes keep their order
                held = None
            if held is None and self.reorder_rate > 0 and self._rng.random() < self.reorder_rate:
                self._held = change
                self.reordered += 1
                return
            self._put(change)
            if held is not None:
                self._put(held)  # sent after a later change of another object

    def _put(self, change: tuple[tuple[str, int], list[bytes], bytes]) -> None:
        for key in change[1]:
            self._queue.put((key, change[2]))

    def _flush_held(self) -> None:
        with self._held_lock:
            held, self._held = self._held, None
            if held is not None:
                self._put(held)

    def _run(self) -> None:
        while True:
            try:
                key, content = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._flush_held()  # nothing came after it: send it anyway
                continue
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
        return [f"EVENT HOST {oid}/{state}/ ".encode(), f"EVENT STATE HOST/{state}//{oid} ".encode()]
    lcm = lcm or "LCM_INIT"
    return [f"EVENT VM {oid}/{state}/{lcm} ".encode(), f"EVENT STATE VM/{state}/{lcm}/{oid} ".encode()]
