"""How a SQL store runs its operations: ops, transactions, the retry loop and migrations.

Every :class:`~fastjob.store.base.Store` method of the SQL stores is written once as a
"sans-IO" generator (an *op*, :mod:`.statements`): it yields :class:`~.statements.Stmt` objects
and receives a :class:`~.statements.Result` for each, and its return value is the method's
result. A backend only has to drive an op inside a transaction (:meth:`SQLRunner._attempt`):

* SQLite drives the whole op synchronously in its one dedicated thread (one thread hop per
  call, and ``claim_due``'s ``next_fire`` callback runs in that thread);
* MySQL drives it with ``await cursor.execute(...)`` on a pooled aiomysql connection.

The retry loop (transient errors, exponential backoff, a total time bound, StoreError at the
end) is shared; the backends say which exceptions are theirs and which are transient.
SQL is written with ``?`` placeholders; the MySQL backend turns them into ``%s``.
"""
from __future__ import annotations

import abc
import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .base import Store, StoreError
from .dialect import Dialect
from .schema import LATEST_VERSION, MIGRATIONS, MYSQL_TOLERATED, SCHEMA_VERSION_DDL
from .statements import Op, RetryTx, Stmt, T

log = logging.getLogger("fastjob.store")


@dataclass(slots=True)
class Attempts:
    """Per-call state that survives retries: lets an op recognise rows it committed in an
    attempt whose COMMIT reply was lost (the connection died after the server committed)."""

    tried_insert: bool = False


class SQLRunner(Store):
    """Runs ops with retries; a backend provides :meth:`_attempt` and says which errors are transient."""

    dialect: Dialect

    def __init__(self, *, retry_total: float = 10.0, retry_initial: float = 0.05,
                 retry_max: float = 1.0) -> None:
        self.retry_total = retry_total
        self.retry_initial = retry_initial
        self.retry_max = retry_max

    #: Set by a backend whose multi-row INSERT takes consecutive auto-increment ids (InnoDB
    #: autoinc lock mode 0/1, SQLite): the ids of a fully inserted chunk follow from its first
    #: or last id, so claim_due needs no RETURNING (a partly skipped chunk is read back). This
    #: holds for INSERT … SELECT too: lock modes 0 and 1 keep the table's AUTO-INC lock for the
    #: whole statement.
    consecutive_ids = False
    #: Set by a backend with JSON_ARRAYAGG (MySQL >= 5.7.22, MariaDB >= 10.5): claim_due then
    #: reads the due jobs as ONE JSON value, decoded in C, instead of 10k rows that the
    #: pure-Python MySQL driver parses column by column (about 4x slower).
    json_rows = False
    #: Set by a backend with JSON_TABLE (MariaDB >= 10.6, MySQL >= 8.0.4): claim_due then sends
    #: its fires and next trigger times as one JSON parameter per statement (Dialect.json_rel).
    json_table = False

    # ---- what a backend provides -----------------------------------------------------
    @abc.abstractmethod
    async def _attempt(self, factory: Callable[[], Op[T]], tx: bool) -> T:
        """Run one op once: in one transaction if ``tx`` (committing at the end, rolling back
        on any exception), else each statement in autocommit mode."""

    @abc.abstractmethod
    def _is_driver_error(self, exc: BaseException) -> bool:
        """The exception came from the database or the connection to it."""

    @abc.abstractmethod
    def _is_transient(self, exc: BaseException) -> bool:
        """Worth retrying: lost connection, server restarting, lock contention, deadlock."""

    # ---- retry loop --------------------------------------------------------------------
    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` until it succeeds, a non-transient error occurs, or the time bound
        is spent. Raises StoreError (NotOwnerError passes through untouched, never retried);
        errors that did not come from the database (a caller's callback) propagate as is."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        delay = self.retry_initial
        tries = 0
        while True:
            tries += 1
            try:
                return await attempt()
            except StoreError:
                raise
            except RetryTx:
                if loop.time() - start > self.retry_total:
                    raise StoreError(f"{what}: kept losing a race for {self.retry_total:.0f}s") from None
                continue
            except Exception as exc:
                if not self._is_driver_error(exc):
                    raise
                if not self._is_transient(exc):
                    raise StoreError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
                elapsed = loop.time() - start
                if elapsed + delay > self.retry_total:
                    raise StoreError(
                        f"{what}: database unavailable for {elapsed:.1f}s after {tries} attempts:"
                        f" {type(exc).__name__}: {exc}"
                    ) from exc
                log.warning("store %s: transient error (attempt %d), retrying in %.2fs: %s",
                            what, tries, delay, exc)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, self.retry_max)

    async def _run(self, what: str, factory: Callable[[], Op[T]], *, tx: bool) -> T:
        observer = self.observer
        if observer is None:
            return await self._retrying(what, lambda: self._attempt(factory, tx))
        started = time.perf_counter()
        try:
            result = await self._retrying(what, lambda: self._attempt(factory, tx))
        except StoreError:
            observer(what, time.perf_counter() - started, False)
            raise
        observer(what, time.perf_counter() - started, True)
        return result

    # ---- migrations --------------------------------------------------------------------
    async def _migrate(self) -> None:
        """Bring the schema to LATEST_VERSION; safe with several servers doing it at once."""
        await self._run("migrate", self._op_bootstrap, tx=False)
        while True:
            version = await self._run("migrate", self._op_schema_version, tx=False)
            if version >= LATEST_VERSION:
                if version > LATEST_VERSION:
                    log.warning("schema version %d is newer than this code (%d)", version, LATEST_VERSION)
                return
            await self._run("migrate", functools.partial(self._op_migrate_step, version + 1),
                            tx=self.dialect.transactional_ddl)

    def _op_bootstrap(self) -> Op[None]:
        yield Stmt(SCHEMA_VERSION_DDL[self.dialect.name])
        yield Stmt(self.dialect.insert("schema_version", ("id", "version"), 1, ignore=True), (1, 0))

    def _op_schema_version(self) -> Op[int]:
        r = yield Stmt("SELECT version FROM schema_version WHERE id = 1")
        return int(r.rows[0][0])

    def _op_migrate_step(self, target: int) -> Op[None]:
        r = yield Stmt("SELECT version FROM schema_version WHERE id = 1")
        if int(r.rows[0][0]) != target - 1:
            return  # someone else moved it; the caller re-reads
        for sql in MIGRATIONS[self.dialect.name][target - 1]:
            yield Stmt(sql, tolerate=MYSQL_TOLERATED)
        r = yield Stmt("UPDATE schema_version SET version = ? WHERE id = 1 AND version = ?",
                       (target, target - 1))
        if r.rowcount == 1:
            log.info("store schema migrated to version %d", target)

    def _op_exec(self, sql: str, params: Sequence[Any] = ()) -> Op[int]:
        r = yield Stmt(sql, params)
        return r.rowcount

    def _op_query(self, sql: str, params: Sequence[Any] = ()) -> Op[list[tuple[Any, ...]]]:
        r = yield Stmt(sql, params)
        return r.rows
