"""The language between the SQL stores' operations and their drivers.

Every :class:`~fastjob.store.base.Store` method is written once (store/sql.py) as a "sans-IO"
generator, an *op*: it yields :class:`Stmt` objects and receives a :class:`Result` for each, and
its return value is the method's result. A backend only drives ops: SQLite synchronously in its
one dedicated thread, MySQL with ``await cursor.execute(...)`` on a pooled connection. SQL is
written with ``?`` placeholders; the MySQL backend turns them into ``%s``.
"""
from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

#: Rows per multi-row statement: keeps statements well under SQLite's 32766 variables and
#: MySQL's max_allowed_packet while amortising the round trip.
CHUNK_ROWS = 1000
#: Rows per statement when they travel as one JSON parameter (~25 bytes a row: 10k rows stay
#: far below max_allowed_packet, whose smallest default is MariaDB's 16 MB).
JSON_CHUNK_ROWS = 10_000


@dataclass(slots=True)
class Stmt:
    """One statement an op wants executed."""

    sql: str
    params: Sequence[Any] = ()
    #: driver error codes that mean "already done" for this statement: the driver answers
    #: an empty Result instead of raising (MySQL DDL run twice by servers migrating at once)
    tolerate: tuple[int, ...] = ()


@dataclass(slots=True)
class Result:
    """What the driver answered: all rows (if any), affected/matched rows, last insert id."""

    rows: list[tuple[Any, ...]]
    rowcount: int
    lastrowid: int | None


Op = Generator[Stmt, Result, T]


class RetryTx(Exception):
    """Raised by an op that lost a benign race (e.g. a concurrent insert of the same job):
    the backend rolls back and the op is run again in a fresh transaction."""



def chunks(seq: Sequence[T], n: int = CHUNK_ROWS) -> Iterable[Sequence[T]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def flat(rows: Iterable[Sequence[Any]]) -> list[Any]:
    return [v for row in rows for v in row]
