"""FastJob: a distributed, lock-free job scheduler.

The public API is the embeddable worker and the admin API's client; the server runs as
``fastjob-server``. ``Client`` (and aiohttp under it, 0.15 s to import) loads on first use, so a
worker process does not pay for it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .context import JobContext
from .protocol import ProtocolError, RemoteError
from .schedule import ScheduleError
from .worker import Worker, WorkerError

if TYPE_CHECKING:
    from .client import ApiError, Client

__version__ = "0.1.0"

__all__ = [
    "ApiError", "Client", "JobContext", "ProtocolError", "RemoteError", "ScheduleError", "Worker", "WorkerError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in ("ApiError", "Client"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'fastjob' has no attribute {name!r}")
