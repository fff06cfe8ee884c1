"""The SQL spellings that differ between the backends: one class per backend, which owns its
capability flags; the operations (store/sql.py) ask their store's dialect for each statement.

Statement builders are cached: a dialect is a module constant (one per backend, or one per
store when a test forces a strategy), so the caches live as long as the process.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from .statements import flat


class Dialect:
    """What every backend spells alike; subclasses spell the rest."""

    #: the backend's name, as in its URLs
    name = ""
    #: DDL can run inside a transaction (SQLite) rather than committing implicitly (MySQL).
    transactional_ddl = False

    def __init__(self, *, returning: bool) -> None:
        #: INSERT … RETURNING is used (SQLite >= 3.35, MariaDB >= 10.5; not MySQL).
        self.returning = returning

    def _ignore(self, sql: str) -> str:
        """``sql`` (INSERT INTO …) made to skip rows that hit a UNIQUE key."""
        raise NotImplementedError

    @functools.lru_cache(maxsize=256)  # noqa: B019 - dialects are module constants, never freed
    def insert(self, table: str, cols: tuple[str, ...], nrows: int, *, ignore: bool = False,
               returning: str | None = None) -> str:
        """A multi-row INSERT; ``ignore`` skips rows that hit a UNIQUE key."""
        one = "(" + ",".join("?" * len(cols)) + ")"
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES {','.join([one] * nrows)}"
        if ignore:
            sql = self._ignore(sql)
        if returning:
            sql += f" RETURNING {returning}"
        return sql

    def insert_shared(self, table: str, cols: tuple[str, ...], shared: tuple[str, ...], nrows: int, *,
                      returning: str | None = None) -> str:
        """A multi-row INSERT that skips rows hitting a UNIQUE key, of rows that differ only in
        ``cols`` and share the values of ``shared``; params from :meth:`shared_params`."""
        raise NotImplementedError

    def shared_params(self, rows: Sequence[Sequence[Any]], shared: Sequence[Any]) -> list[Any]:
        """The parameters of :meth:`insert_shared`'s statement for ``rows``."""
        raise NotImplementedError

    def upsert(self, table: str, cols: tuple[str, ...], key: str, update: tuple[str, ...]) -> str:
        """INSERT one row, or update ``update`` columns of the row with the same ``key``."""
        raise NotImplementedError

    def update_join(self, table: str, cols: tuple[str, ...], nrows: int,
                    sets: tuple[tuple[str, str], ...], where: str) -> str:
        """UPDATE ``table`` from an inline relation ``u(cols)`` of ``nrows`` parameter rows,
        joined on ``table.id = u.id`` (``cols[0]`` must be ``id``): one statement for many
        rows with different values."""
        raise NotImplementedError

    def first_inserted_id(self, lastrowid: int | None, nrows: int, known_max: int) -> int:
        """A lower bound of the ids a multi-row INSERT of ``nrows`` took, from what the driver
        reports; ``known_max`` is the highest id the same op saw before."""
        raise NotImplementedError

    @staticmethod
    def remainder(a: str, b: str) -> str:
        """``a`` modulo ``b`` for integers (MySQL's driver takes ``%`` for a placeholder)."""
        return f"MOD({a}, {b})"

    @staticmethod
    def in_list(n: int) -> str:
        return "(" + ",".join("?" * n) + ")"

    # Only where the database has JSON_TABLE (the store's probe sets ``json_table``).
    def insert_shared_json(self, table: str, cols: tuple[str, ...], shared: tuple[str, ...]) -> str:
        raise NotImplementedError(f"{self.name} has no JSON_TABLE")

    def update_join_json(self, table: str, cols: tuple[str, ...], sets: tuple[tuple[str, str], ...],
                         where: str) -> str:
        raise NotImplementedError(f"{self.name} has no JSON_TABLE")


class SQLiteDialect(Dialect):
    name = "sqlite"
    transactional_ddl = True

    @staticmethod
    def remainder(a: str, b: str) -> str:
        return f"(({a}) % ({b}))"  # SQLite has MOD() only when built with its math functions

    def _ignore(self, sql: str) -> str:
        return sql + " ON CONFLICT DO NOTHING"

    @functools.lru_cache(maxsize=64)  # noqa: B019 - dialects are module constants, never freed
    def insert_shared(self, table: str, cols: tuple[str, ...], shared: tuple[str, ...], nrows: int, *,
                      returning: str | None = None) -> str:
        """Binds the shared values once (INSERT … SELECT … FROM (VALUES …)): binding is much of
        SQLite's insert time."""
        one = "(" + ",".join("?" * len(cols)) + ")"
        picks = ", ".join([f"column{i + 1}" for i in range(len(cols))] + ["?"] * len(shared))
        # "WHERE true" keeps ON CONFLICT from parsing as a join's ON (SQLite's documented rule)
        sql = (f"INSERT INTO {table} ({', '.join(cols + shared)}) SELECT {picks}"
               f" FROM (VALUES {','.join([one] * nrows)}) WHERE true ON CONFLICT DO NOTHING")
        return sql + f" RETURNING {returning}" if returning else sql

    def shared_params(self, rows: Sequence[Sequence[Any]], shared: Sequence[Any]) -> list[Any]:
        return [*shared, *flat(rows)]

    @functools.lru_cache(maxsize=64)  # noqa: B019 - dialects are module constants, never freed
    def upsert(self, table: str, cols: tuple[str, ...], key: str, update: tuple[str, ...]) -> str:
        return (self.insert(table, cols, 1) + f" ON CONFLICT ({key}) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in update))

    @functools.lru_cache(maxsize=64)  # noqa: B019 - dialects are module constants, never freed
    def update_join(self, table: str, cols: tuple[str, ...], nrows: int,
                    sets: tuple[tuple[str, str], ...], where: str) -> str:
        """UPDATE … FROM (VALUES …)."""
        one = "(" + ",".join("?" * len(cols)) + ")"
        rel = ",".join([one] * nrows)
        set_sql = ", ".join(f"{c} = {e}" for c, e in sets)
        # Not "WITH u(...) AS (VALUES ...)": Python's sqlite3 reports no rowcount for a
        # statement that does not start with UPDATE.
        named = ", ".join(f"column{i + 1} AS {c}" for i, c in enumerate(cols))
        return (f"UPDATE {table} SET {set_sql} FROM (SELECT {named} FROM (VALUES {rel})) AS u"
                f" WHERE {table}.id = u.id AND ({where})")

    def first_inserted_id(self, lastrowid: int | None, nrows: int, known_max: int) -> int:
        """SQLite reports the last id, and a skipped row may use up an id."""
        return max((lastrowid or 0) - nrows + 1, known_max + 1)


class MySQLDialect(Dialect):
    name = "mysql"
    transactional_ddl = False

    def _ignore(self, sql: str) -> str:
        return "INSERT IGNORE INTO" + sql.removeprefix("INSERT INTO")

    def insert_shared(self, table: str, cols: tuple[str, ...], shared: tuple[str, ...], nrows: int, *,
                      returning: str | None = None) -> str:
        """Repeats the shared values in every row of a plain VALUES list: MySQL's derived tables
        parse slower than VALUES, and the backend escapes each object once."""
        return self.insert(table, cols + shared, nrows, ignore=True)

    def shared_params(self, rows: Sequence[Sequence[Any]], shared: Sequence[Any]) -> list[Any]:
        shared = tuple(shared)
        return [v for row in rows for v in (*row, *shared)]

    @functools.lru_cache(maxsize=64)  # noqa: B019 - dialects are module constants, never freed
    def upsert(self, table: str, cols: tuple[str, ...], key: str, update: tuple[str, ...]) -> str:
        return (self.insert(table, cols, 1) + " ON DUPLICATE KEY UPDATE "
                + ", ".join(f"{c} = VALUES({c})" for c in update))

    @functools.lru_cache(maxsize=64)  # noqa: B019 - dialects are module constants, never freed
    def update_join(self, table: str, cols: tuple[str, ...], nrows: int,
                    sets: tuple[tuple[str, str], ...], where: str) -> str:
        """A UNION ALL derived table and a multi-table UPDATE (portable to MySQL 8 and MariaDB)."""
        first = "SELECT " + ", ".join(f"? AS {c}" for c in cols)
        rest = " UNION ALL SELECT " + ",".join("?" * len(cols))
        rel = first + rest * (nrows - 1)
        set_sql = ", ".join(f"{table}.{c} = {e}" for c, e in sets)
        return f"UPDATE {table} JOIN ({rel}) AS u ON {table}.id = u.id SET {set_sql} WHERE {where}"

    def first_inserted_id(self, lastrowid: int | None, nrows: int, known_max: int) -> int:
        """MySQL reports the first id a multi-row INSERT took (set by every INSERT that wrote a row)."""
        return lastrowid or 0

    # JSON_TABLE (MariaDB >= 10.6, MySQL >= 8.0.4): a relation of integer rows sent as ONE JSON
    # parameter. Much cheaper than a literal VALUES / UNION ALL list of 10k rows both to build
    # (json.dumps in C instead of escaping 30k Python objects) and for the server to parse.
    @staticmethod
    def json_rel(cols: tuple[str, ...], ordinal: bool = False) -> str:
        """``JSON_TABLE(?, …) AS u`` with BIGINT columns ``cols`` from a JSON array of arrays;
        ``ordinal`` adds ``u.n``, the 1-based position of the row in the array."""
        defs = [f"{c} BIGINT PATH '$[{i}]'" for i, c in enumerate(cols)]
        if ordinal:
            defs.insert(0, "n FOR ORDINALITY")
        return f"JSON_TABLE(?, '$[*]' COLUMNS ({', '.join(defs)})) AS u"

    @functools.lru_cache(maxsize=16)  # noqa: B019 - dialects are module constants, never freed
    def insert_shared_json(self, table: str, cols: tuple[str, ...], shared: tuple[str, ...]) -> str:
        """:meth:`insert_shared` from a JSON_TABLE; params ``[*shared, json_rows]``. ORDER BY
        the array position: the rows must take their consecutive ids in that order (the
        caller maps ids by position), which a SELECT without ORDER BY does not promise."""
        picks = ", ".join([f"u.{c}" for c in cols] + ["?"] * len(shared))
        return (f"INSERT IGNORE INTO {table} ({', '.join(cols + shared)}) SELECT {picks}"
                f" FROM {self.json_rel(cols, ordinal=True)} ORDER BY u.n")

    @functools.lru_cache(maxsize=16)  # noqa: B019 - dialects are module constants, never freed
    def update_join_json(self, table: str, cols: tuple[str, ...], sets: tuple[tuple[str, str], ...],
                         where: str) -> str:
        """:meth:`update_join` from a JSON_TABLE of integer columns; params ``[json_rows]``."""
        set_sql = ", ".join(f"{table}.{c} = {e}" for c, e in sets)
        return (f"UPDATE {table} JOIN {self.json_rel(cols)} ON {table}.id = u.id"
                f" SET {set_sql} WHERE {where}")
