"""Structured logs: one JSON object per line. Fields go in `extra={"kv": {...}}`; never pass credentials."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "t": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "kv", None) or {})
        if record.exc_info and record.exc_info[1] is not None:
            # Type and message only: a traceback's locals/reprs could carry the oned session.
            exc = record.exc_info[1]
            entry["error"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(entry, default=str)


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("oneha")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def kv(**fields: Any) -> dict[str, Any]:
    """`log.info("msg", extra=kv(a=1))`."""
    return {"kv": fields}


def now() -> float:
    return time.time()
