"""Log formats: text (the default) or ``--log-format json``, one JSON object per line.

A JSON line carries the time, level, logger, message and this server's id, and the app, job,
instance and worker a record names (``extra={"app": ..., "job": ..., "instance": ...}`` at the
call; those fields are left out when a record names none).
"""
from __future__ import annotations

import json
import logging
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
#: The record attributes a log call may set with ``extra`` that a JSON line carries.
CONTEXT_FIELDS = ("app", "job", "instance", "worker")


class JsonFormatter(logging.Formatter):
    def __init__(self, server: str = "") -> None:
        super().__init__()
        self.server = server

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "server": self.server,
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str, fmt: str, server: str = "") -> logging.Formatter:
    """Log to stderr at ``level`` in ``fmt``; returns the formatter (its server id can be set later)."""
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = JsonFormatter(server) if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return formatter
