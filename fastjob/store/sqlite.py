"""Embedded SQLite backend: the default store of a single server.

Driver choice: the stdlib ``sqlite3`` on ONE dedicated thread rather than aiosqlite. aiosqlite
also runs a thread per connection, but hops between the loop and that thread for every
execute/fetch; here a whole op (BEGIN IMMEDIATE … COMMIT, every statement of ``claim_due``
and its ``next_fire`` calls) runs in the thread as one synchronous function, so a call costs
one hop and the write lock is never held across event-loop turns.

WAL journal (readers never block the writer), synchronous=NORMAL (durable across process
crashes; a power cut may lose the last commits), and a busy timeout. Several processes may
open one file: every write transaction starts with BEGIN IMMEDIATE, so writers queue on the
database lock up front instead of deadlocking on a read->write upgrade; "database is locked"
beyond the busy timeout is retried by the shared retry loop.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from .base import StoreError
from .dialect import SQLiteDialect
from .sql import SQLStore
from .statements import Op, Result, Stmt

T = TypeVar("T")

# RETURNING needs SQLite 3.35; UPDATE … FROM needs 3.33.
if sqlite3.sqlite_version_info < (3, 35, 0):  # pragma: no cover - depends on the platform
    raise ImportError(f"fastjob needs SQLite >= 3.35 (found {sqlite3.sqlite_version})")

SQLITE = SQLiteDialect(returning=True)


class SQLiteStore(SQLStore):
    """SQLite store on one file; see the module docstring for the threading model."""

    dialect = SQLITE
    #: The one writer (BEGIN IMMEDIATE) gives a multi-row INSERT ids max(rowid)+1, +2, …: a
    #: chunk's ids follow from lastrowid, cheaper than RETURNING (a third of the insert time).
    consecutive_ids = True

    def __init__(self, path: str, *, busy_timeout: float = 5.0, **retry: Any) -> None:
        super().__init__(**retry)
        self.path = path
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        """``sqlite:///relative/path.db`` or ``sqlite:////abs/path.db``; options as a query
        string: ``?busy_timeout=5&retry_total=10``."""
        if not url.startswith("sqlite:///"):
            raise ValueError(f"bad SQLite URL {url!r}: use sqlite:///relative.db or sqlite:////abs/path.db")
        rest = url[len("sqlite:///"):]
        path, _, query = rest.partition("?")
        if not path or path == ":memory:":
            raise ValueError("SQLite store needs a file path (several connections share it)")
        opts = {k: float(v) for k, v in parse_qsl(query)}
        return cls(path, **opts)

    # ---- lifecycle -----------------------------------------------------------------------
    async def open(self) -> None:
        if self._conn is not None:
            return
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"fastjob-sqlite:{os.path.basename(self.path)}")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, self._connect)
            await self._run("open", self._op_pragmas, tx=False)
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            return sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {self.path!r}: {exc}") from exc

    def _op_pragmas(self) -> Op[None]:
        yield Stmt(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        r = yield Stmt("PRAGMA journal_mode = WAL")
        if r.rows and str(r.rows[0][0]).lower() != "wal":
            raise StoreError(f"SQLite refused WAL journal mode on {self.path!r} (got {r.rows[0][0]!r})")
        yield Stmt("PRAGMA synchronous = NORMAL")
        # A 10k-row claim touches a few thousand pages: keep them cached (64 MiB, not 2 MiB).
        yield Stmt("PRAGMA cache_size = -65536")
        yield Stmt("PRAGMA temp_store = MEMORY")

    async def close(self) -> None:
        conn, executor = self._conn, self._executor
        self._conn = None
        self._executor = None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=False)

    # ---- driving ops -----------------------------------------------------------------------
    async def _attempt(self, factory: Callable[[], Op[T]], tx: bool) -> T:
        if self._conn is None or self._executor is None:
            raise StoreError("SQLite store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._drive, factory, tx)

    def _drive(self, factory: Callable[[], Op[T]], tx: bool) -> T:
        """Runs in the store thread: the whole op, one transaction if ``tx``."""
        conn = self._conn
        if conn is None:
            raise StoreError("SQLite store is closed")
        cur = conn.cursor()
        try:
            if tx:
                cur.execute("BEGIN IMMEDIATE")
            gen = factory()
            try:
                stmt = next(gen)
                while True:
                    cur.execute(stmt.sql, stmt.params)
                    rows = cur.fetchall() if cur.description is not None else []
                    stmt = gen.send(Result(rows, cur.rowcount, cur.lastrowid))
            except StopIteration as stop:
                value: T = stop.value
            if tx:
                cur.execute("COMMIT")
            return value
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.rollback()
                except sqlite3.Error:
                    pass
            raise
        finally:
            cur.close()

    def _is_driver_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error)

    def _is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, sqlite3.OperationalError):
            msg = str(exc).lower()
            return "locked" in msg or "busy" in msg
        return False
