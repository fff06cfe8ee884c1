"""FastJob: a distributed, lock-free job scheduler.

The public API is the embeddable worker; the server runs as ``fastjob-server``.
"""
from .client import ApiError, Client
from .context import JobContext
from .protocol import ProtocolError, RemoteError
from .schedule import ScheduleError
from .worker import Worker, WorkerError

__version__ = "0.1.0"

__all__ = [
    "ApiError", "Client", "JobContext", "ProtocolError", "RemoteError", "ScheduleError", "Worker", "WorkerError",
    "__version__",
]
