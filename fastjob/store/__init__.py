"""Durable state: pick a backend by URL (``sqlite:///path`` or ``mysql://user:pass@host:port/db``)."""
from __future__ import annotations

from .base import (
    AppRow,
    FirePlan,
    FirePlanner,
    NotOwnerError,
    ServerRow,
    Store,
    StoreError,
    WorkerRow,
)

DEFAULT_URL = "sqlite:///fastjob.db"


def create_store(url: str = DEFAULT_URL) -> Store:
    """Build (not open) the store named by ``url``."""
    if url.startswith("sqlite://"):
        from .sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if url.startswith(("mysql://", "mariadb://")):
        try:
            from .mysql import MySQLStore
        except ImportError as exc:  # the driver is an extra: a worker-only install has none
            raise ValueError(f"the MySQL store needs its driver: pip install 'fastjob[mysql]' ({exc})") from None

        return MySQLStore.from_url(url)
    raise ValueError(f"unsupported store URL {url!r}: use sqlite:///path or mysql://user:pass@host:port/db")


__all__ = [
    "AppRow", "DEFAULT_URL", "FirePlan", "FirePlanner", "NotOwnerError", "ServerRow", "Store", "StoreError",
    "WorkerRow", "create_store",
]
