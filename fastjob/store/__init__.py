"""Durable state: pick a backend by URL (``sqlite:///path`` or ``mysql://user:pass@host:port/db``)."""
from __future__ import annotations

from .base import (
    FINAL_STATUSES,
    UNFINISHED_STATUSES,
    AppRow,
    InstanceRow,
    InstanceUpdate,
    JobRow,
    JobSpec,
    LogLine,
    NotOwnerError,
    ScheduleType,
    ServerRow,
    Status,
    Store,
    StoreError,
)

DEFAULT_URL = "sqlite:///fastjob.db"


def create_store(url: str = DEFAULT_URL) -> Store:
    """Build (not open) the store named by ``url``."""
    if url.startswith("sqlite://"):
        from .sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if url.startswith(("mysql://", "mariadb://")):
        from .mysql import MySQLStore

        return MySQLStore.from_url(url)
    raise ValueError(f"unsupported store URL {url!r}: use sqlite:///path or mysql://user:pass@host:port/db")


__all__ = [
    "AppRow", "DEFAULT_URL", "FINAL_STATUSES", "InstanceRow", "InstanceUpdate", "JobRow", "JobSpec",
    "LogLine", "NotOwnerError", "ScheduleType", "ServerRow", "Status", "Store", "StoreError",
    "UNFINISHED_STATUSES", "create_store",
]
