"""Durable state: pick a backend by URL (``sqlite:///path`` or ``mysql://user:pass@host:port/db``).

``memory://`` is the in-process store of rule tests (store/memory.py), durable for no longer than
the process: a fresh database per ``create_store`` call, or with ``memory://NAME`` the one database
of that NAME in this process, shared by every store built on it (as stores on one SQL database).
"""
from __future__ import annotations

from .base import (
    AppRow,
    AuditEntry,
    FirePlan,
    FirePlanner,
    NotOwnerError,
    OwnershipChange,
    ServerRow,
    Store,
    StoreError,
    TokenRow,
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
    if url.startswith("memory://"):
        from .memory import MemoryStore

        return MemoryStore.from_url(url)
    raise ValueError(f"unsupported store URL {url!r}: use sqlite:///path, mysql://user:pass@host:port/db,"
                     " memory:// or memory://NAME")


__all__ = [
    "AppRow", "AuditEntry", "DEFAULT_URL", "FirePlan", "FirePlanner", "NotOwnerError", "OwnershipChange",
    "ServerRow", "Store", "StoreError", "TokenRow", "WorkerRow", "create_store",
]
