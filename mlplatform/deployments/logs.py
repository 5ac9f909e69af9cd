"""What the serving deployments record: one JSON line per request and event, and the
latency buckets their Prometheus histograms share."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

log = logging.getLogger("mlplatform.serve")
LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


def json_logs(deployment: str) -> None:
    """One JSON object per request and line, in `requests_<deployment>_<pid>.jsonl` beside
    this replica's Serve log (the Ray logs directory's `serve/`). Written straight to the file:
    Serve's stderr capture would wrap each line in its own format and cost a stack walk per
    line. Falls back to the process's stderr when Serve's log directory is unknown."""
    if log.handlers:
        return
    serve_handlers = logging.getLogger("ray.serve").handlers  # Serve buffers in a MemoryHandler
    serve_files = [h.baseFilename for h in [*serve_handlers, *(getattr(h, "target", None) for h in serve_handlers)]
                   if isinstance(h, logging.FileHandler)]
    if serve_files:
        path = os.path.join(os.path.dirname(serve_files[0]), f"requests_{deployment}_{os.getpid()}.jsonl")
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(_JsonLines())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class _JsonLines(logging.Formatter):
    """Every record one JSON line: an event's as written; any other message (a warning, an
    exception with its traceback) as {"event": "log", "level", "message", "exception"}."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if message.startswith("{") and not record.exc_info:
            return message
        fields: dict[str, Any] = {"event": "log", "level": record.levelname, "message": message}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields)


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One JSON line: {"event": event, **fields}."""
    log.log(level, json.dumps({"event": event, **fields}))


def log_request(request_id: str, route: str, version: str, status: int, latency_s: float,
                batch_size: int | None) -> None:
    """The request's line; `batch_size`: images in the forward pass that answered (the
    largest, for several), when the request reached a model."""
    fields: dict[str, Any] = {"request_id": request_id, "route": route, "version": version,
                              "status": status, "latency_ms": round(latency_s * 1000, 2)}
    if batch_size is not None:
        fields["batch_size"] = batch_size
    log_event("request", **fields)
