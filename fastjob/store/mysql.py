"""MySQL / MariaDB backend for clusters (aiomysql pool).

Connections run in autocommit mode, so single statements commit on their own; a multi-statement
op runs between an explicit BEGIN and COMMIT on one pooled connection. Sessions use READ
COMMITTED (fewer gap locks on the WAL's UNIQUE key, so concurrent claims of different apps do
not deadlock on each other's ranges) and CLIENT.FOUND_ROWS, so an UPDATE reports the rows it
*matched*: a fence or heartbeat that writes an unchanged value still counts as 1.

Transient failures (server restarting, connection lost or killed, deadlock, lock wait timeout)
close the connection, drop idle pooled ones that died with it, and are retried by the shared
loop; the pool recycles connections well before the server's wait_timeout.

Once the store serves a registered server, every connection records its id in ``db_sessions``
before its first statement, so a survivor can KILL the sessions of a server it judged dead: a
process frozen inside a transaction would otherwise hold its row locks (the app row its fence
touched) for as long as its idle connection lives, and the takeover CAS would wait on them.
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import aiomysql
import pymysql
from pymysql.constants import CLIENT

from .base import StoreError
from .dialect import MySQLDialect
from .sql import SQLStore
from .statements import Op, Result, RetryTx, Stmt

log = logging.getLogger("fastjob.store")
T = TypeVar("T")

# No INSERT … RETURNING (MySQL lacks it; on MariaDB every returned row is one more protocol
# packet to parse in Python): inserted ids come from the statement's first id instead.
MYSQL = MySQLDialect(returning=False)

# Server/client error codes worth a retry.
TRANSIENT_CODES = frozenset({
    1040,  # too many connections
    1053,  # server shutdown in progress
    1205,  # lock wait timeout
    1213,  # deadlock: the transaction was rolled back
    1317,  # query interrupted
    1927,  # connection was killed (MariaDB)
    2002, 2003, 2005,  # cannot connect
    2006,  # server has gone away
    2013,  # lost connection during query
    2014,  # commands out of sync (a broken connection)
    2055,  # lost connection, system error
    4031,  # disconnected by the server for inactivity (MySQL 8)
})
#: KILL of a session that already ended (1094), or of another user's without the privilege (1095).
KILL_TOLERATED = (1094, 1095)


class _QuietCursor(aiomysql.Cursor):
    """Skips aiomysql's SHOW WARNINGS round trip after every statement with warnings: INSERT
    IGNORE's duplicate-key and CREATE TABLE IF NOT EXISTS's "already exists" warnings are the
    expected outcome here, not news, and the extra query would cost a round trip per claim."""

    async def _show_warnings(self, conn: Any) -> None:
        return None


class MySQLStore(SQLStore):
    """Store on MySQL >= 5.7 / MariaDB >= 10.3."""

    dialect = MYSQL
    concurrent_writes = True

    def __init__(self, host: str = "127.0.0.1", port: int = 3306, user: str = "root", password: str = "",
                 db: str = "fastjob", *, pool_min: int = 1, pool_max: int = 10, connect_timeout: float = 5.0,
                 pool_recycle: float = 3600.0, op_timeout: float = 60.0, **retry: Any) -> None:
        super().__init__(**retry)
        self.host, self.port, self.user, self.password, self.db = host, port, user, password, db
        self.pool_min, self.pool_max = int(pool_min), int(pool_max)
        self.connect_timeout = connect_timeout
        self.pool_recycle = pool_recycle
        self.op_timeout = op_timeout
        self._pool: aiomysql.Pool | None = None
        self._session_owner: str | None = None  # the server whose sessions these are
        self._recorded: weakref.WeakSet[aiomysql.Connection] = weakref.WeakSet()

    @classmethod
    def from_url(cls, url: str) -> MySQLStore:
        """``mysql://user:pass@host:port/db?pool_max=10&connect_timeout=5&retry_total=10``."""
        parts = urlsplit(url)
        if parts.scheme not in ("mysql", "mariadb") or not parts.path.strip("/"):
            raise ValueError(f"bad MySQL URL {url!r}: use mysql://user:pass@host:port/db")
        opts: dict[str, Any] = {k: float(v) for k, v in parse_qsl(parts.query)}
        return cls(parts.hostname or "127.0.0.1", parts.port or 3306, unquote(parts.username or "root"),
                   unquote(parts.password or ""), unquote(parts.path.strip("/")), **opts)

    # ---- lifecycle -----------------------------------------------------------------------
    def _conn_kwargs(self) -> dict[str, Any]:
        return dict(host=self.host, port=self.port, user=self.user, password=self.password, db=self.db,
                    charset="utf8mb4", autocommit=True, connect_timeout=self.connect_timeout,
                    client_flag=CLIENT.FOUND_ROWS, cursorclass=_QuietCursor,
                    init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")

    async def open(self) -> None:
        if self._pool is not None:
            return
        # A probe connection learns wait_timeout (the pool must recycle below it) and whether
        # a multi-row INSERT gets consecutive auto-increment ids (lock mode 0 or 1).
        wait_timeout, autoinc_mode, self.json_rows, self.json_table = await self._retrying("open", self._probe)
        self.consecutive_ids = autoinc_mode in (0, 1)
        recycle = min(self.pool_recycle, max(1.0, wait_timeout * 0.5))
        self._pool = await self._retrying("open", lambda: aiomysql.create_pool(
            minsize=self.pool_min, maxsize=self.pool_max, pool_recycle=int(recycle), **self._conn_kwargs()))
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _probe(self) -> tuple[float, int, bool, bool]:
        """wait_timeout, innodb_autoinc_lock_mode, and whether JSON_ARRAYAGG and JSON_TABLE exist."""
        conn = await aiomysql.connect(**self._conn_kwargs())

        async def works(cur: Any, sql: str) -> bool:
            try:
                await cur.execute(sql)
                await cur.fetchall()
                return True
            except pymysql.err.ProgrammingError:  # a syntax error: not in this server version
                return False

        try:
            async with conn.cursor() as cur:
                await cur.execute("SELECT @@wait_timeout, @@innodb_autoinc_lock_mode")
                row = await cur.fetchone()
                # MariaDB >= 10.5 / MySQL >= 5.7.22, and MariaDB >= 10.6 / MySQL >= 8.0.4
                json_agg = await works(cur, "SELECT JSON_ARRAYAGG(1)")
                json_table = await works(cur, "SELECT COUNT(*) FROM " + MYSQL.json_rel(("a",)).replace("?", "'[[1]]'"))
            return float(row[0]), int(row[1]), json_agg, json_table
        finally:
            conn.close()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            await pool.wait_closed()

    # ---- driving ops -----------------------------------------------------------------------
    async def _attempt(self, factory: Callable[[], Op[T]], tx: bool) -> T:
        pool = self._pool
        if pool is None:
            raise StoreError("MySQL store is not open")
        conn = await asyncio.wait_for(pool.acquire(), self.connect_timeout + 1.0)
        healthy = False
        try:
            value = await asyncio.wait_for(self._drive(conn, factory, tx), self.op_timeout)
            healthy = True
            return value
        except (StoreError, RetryTx, pymysql.err.IntegrityError, pymysql.err.ProgrammingError,
                pymysql.err.DataError, pymysql.err.NotSupportedError, ValueError) as exc:
            # the connection is fine, the op is not: roll back and keep the connection
            if not isinstance(exc, pymysql.err.Error) or _code(exc) not in TRANSIENT_CODES:
                healthy = await self._rollback(conn, tx)
            raise
        except Exception as exc:
            if self._is_transient(exc):
                await self._drop_dead_idle(pool)
            raise
        finally:
            if not healthy:
                conn.close()  # the pool discards closed connections
            pool.release(conn)

    async def _drive(self, conn: aiomysql.Connection, factory: Callable[[], Op[T]], tx: bool) -> T:
        async with conn.cursor() as cur:
            if self._session_owner is not None and conn not in self._recorded:
                await self._record_session(cur, self._session_owner)
                self._recorded.add(conn)
            if tx:
                await conn.begin()
            gen = factory()
            try:
                stmt = next(gen)
                while True:
                    sql = stmt.sql.replace("?", "%s")
                    try:
                        await cur.execute(sql % _escape_all(conn, stmt.params) if stmt.params else sql)
                    except pymysql.err.MySQLError as exc:
                        if _code(exc) not in stmt.tolerate:
                            raise
                        stmt = gen.send(Result([], 0, None))
                        continue
                    rows = list(await cur.fetchall()) if cur.description is not None else []
                    stmt = gen.send(Result(rows, cur.rowcount, cur.lastrowid))
            except StopIteration as stop:
                value: T = stop.value
            if tx:
                await conn.commit()
            return value

    @staticmethod
    async def _record_session(cur: aiomysql.Cursor, server_id: str) -> None:
        """Note this connection as ``server_id``'s, and forget the server's sessions that ended
        (PROCESSLIST shows every session of our own user, which theirs are)."""
        await cur.execute("INSERT INTO db_sessions (conn_id, server_id, opened_at)"
                          " VALUES (CONNECTION_ID(), %s, UNIX_TIMESTAMP(NOW(6)))"
                          " ON DUPLICATE KEY UPDATE server_id = VALUES(server_id), opened_at = VALUES(opened_at)",
                          (server_id,))
        await cur.execute("DELETE FROM db_sessions WHERE server_id = %s AND conn_id NOT IN"
                          " (SELECT id FROM information_schema.PROCESSLIST)", (server_id,))

    # ---- sessions of servers ------------------------------------------------------------------
    async def register_server(self, server_id: str, address: str, now: float, http_address: str = "") -> None:
        """Also: from now on this store's connections are ``server_id``'s (one server per store)."""
        self._session_owner = server_id
        await super().register_server(server_id, address, now, http_address)

    async def remove_server(self, server_id: str) -> None:
        await super().remove_server(server_id)
        await self._run("remove_server", lambda: self._op_exec(
            "DELETE FROM db_sessions WHERE server_id = ?", (server_id,)), tx=False)

    async def fence_server(self, server_id: str) -> int:
        if server_id == self._session_owner:
            return 0  # never our own sessions
        return await self._run("fence_server", lambda: self._op_fence_server(server_id), tx=False)

    def _op_fence_server(self, server_id: str) -> Op[int]:
        # Session ids start again from 1 when the database restarts: a row older than the
        # database's own start names somebody else's session now, never to be killed.
        up = yield Stmt("SHOW GLOBAL STATUS LIKE 'Uptime'")
        since_start = float(up.rows[0][1]) + 1.0
        r = yield Stmt("SELECT conn_id FROM db_sessions WHERE server_id = ? AND opened_at >= UNIX_TIMESTAMP() - ?",
                       (server_id, since_start))
        ended = [int(row[0]) for row in r.rows]
        for conn_id in ended:
            yield Stmt(f"KILL CONNECTION {conn_id}", tolerate=KILL_TOLERATED)
        yield Stmt("DELETE FROM db_sessions WHERE server_id = ? AND (conn_id <= ? OR opened_at < UNIX_TIMESTAMP() - ?)",
                   (server_id, max(ended, default=0), since_start))
        return len(ended)

    @staticmethod
    async def _rollback(conn: aiomysql.Connection, tx: bool) -> bool:
        if not tx:
            return True
        try:
            await asyncio.wait_for(conn.rollback(), 5.0)
            return True
        except Exception:
            return False

    @staticmethod
    async def _drop_dead_idle(pool: aiomysql.Pool) -> None:
        """After a lost connection, the idle ones most likely died with it (server restart):
        drop them so the retry connects afresh instead of discovering each corpse in turn."""
        try:
            await pool.clear()
        except Exception:  # pragma: no cover - best effort
            pass

    def _is_driver_error(self, exc: BaseException) -> bool:
        return isinstance(exc, (pymysql.err.Error, OSError, asyncio.TimeoutError, EOFError))

    def _is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, (pymysql.err.OperationalError, pymysql.err.InterfaceError, pymysql.err.InternalError)):
            code = _code(exc)
            # aiomysql raises InterfaceError(0, '') / OperationalError without a code for a
            # connection it found closed
            return code in TRANSIENT_CODES or code in (0, None)
        return isinstance(exc, (ConnectionError, OSError, EOFError, asyncio.TimeoutError))


def _escape_all(conn: aiomysql.Connection, params: Sequence[Any]) -> tuple[str, ...]:
    """The driver's SQL literal of every parameter, escaping each parameter object once.

    A claim's multi-row INSERT passes the same app, status, server, epoch and time objects
    in every row: escaping per distinct object (by identity; the objects live as long as
    ``params``) instead of per position saves most of the escaping. Exact ints take the
    literal pymysql gives them, ``str(value)``, directly."""
    memo = {id(p): p for p in params if p.__class__ is not int}
    memo = {k: conn.escape(v) for k, v in memo.items()}
    return tuple([str(p) if p.__class__ is int else memo[id(p)] for p in params])


def _code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None
