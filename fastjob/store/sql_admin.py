"""The admin API's tables on SQL: instance pages and stats, tokens, the audit log, the
ownership history and trigger idempotency keys (the Store methods of the same names)."""
from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

from ..models import Status
from .base import IDEMPOTENCY_TTL, PRUNABLE, AlarmRow, AuditEntry, OwnershipChange, TokenRow
from .codecs import INST_COLS, SQL_FINAL, dumps, loads
from .dialect import Dialect
from .statements import Op, Stmt, chunks, flat

TOKEN_COLS = ("id", "name", "role", "apps", "salt", "secret_hash", "created_at", "expires_at", "revoked_at")
AUDIT_COLS = ("ts", "actor", "action", "app", "target", "outcome", "detail", "via")
HISTORY_COLS = ("app", "from_server", "to_server", "epoch", "reason", "ts")


# ---- instances -------------------------------------------------------------------------------
def instance_page_query(app: str, job_id: int | None, statuses: Sequence[Status] | None, since_ms: int | None,
                        until_ms: int | None, after: tuple[int, int] | None, limit: int,
                        dialect: Dialect) -> tuple[str, list[Any]]:
    """The SELECT of Store.query_instances: newest planned first, keyset-paginated."""
    sql = f"SELECT {INST_COLS} FROM instances WHERE app = ?"
    params: list[Any] = [app]
    if job_id is not None:
        sql += " AND job_id = ?"
        params.append(job_id)
    if statuses:
        sql += " AND status IN " + dialect.in_list(len(statuses))
        params.extend(Status(s).value for s in statuses)
    if since_ms is not None:
        sql += " AND planned_ms >= ?"
        params.append(since_ms)
    if until_ms is not None:
        sql += " AND planned_ms < ?"
        params.append(until_ms)
    if after is not None:
        sql += " AND (planned_ms < ? OR (planned_ms = ? AND id < ?))"
        params.extend((after[0], after[0], after[1]))
    sql += " ORDER BY planned_ms DESC, id DESC LIMIT ?"
    params.append(max(limit, 0))
    return sql, params


def op_instance_counts(dialect: Dialect, app: str, since_ms: int, until_ms: int,
                       bucket_ms: int) -> Op[list[tuple[int, str, int]]]:
    # the bucket's start, by a remainder (the backends agree on no integer division)
    bucket = "planned_ms - " + dialect.remainder("planned_ms - ?", "?")
    r = yield Stmt(f"SELECT {bucket} AS b, status, COUNT(*) FROM instances WHERE app = ? AND planned_ms >= ?"
                   f" AND planned_ms < ? GROUP BY b, status ORDER BY b", (since_ms, bucket_ms, app, since_ms, until_ms))
    return [(int(b), str(status), int(n)) for b, status, n in r.rows]


def op_lateness_sample(app: str, since_ms: int, until_ms: int, limit: int) -> Op[list[float]]:
    # first attempts only: a retry's "lateness" would count its backoff and the attempts before it
    r = yield Stmt("SELECT started_at - planned_ms / 1000.0 FROM instances WHERE app = ? AND planned_ms >= ?"
                   " AND planned_ms < ? AND started_at IS NOT NULL AND attempt = 1 ORDER BY planned_ms DESC LIMIT ?",
                   (app, since_ms, until_ms, max(limit, 0)))
    return [float(row[0]) for row in r.rows]


# ---- tokens ----------------------------------------------------------------------------------
def token_values(token: TokenRow) -> tuple[Any, ...]:
    apps = None if token.apps is None else json.dumps(token.apps)
    return (token.id, token.name, token.role, apps, token.salt, token.secret_hash, token.created_at,
            token.expires_at, token.revoked_at)


def row_to_token(r: Sequence[Any]) -> TokenRow:
    return TokenRow(r[0], r[1], r[2], None if r[3] is None else list(json.loads(r[3])), r[4], r[5], float(r[6]),
                    None if r[7] is None else float(r[7]), None if r[8] is None else float(r[8]))


TOKEN_SELECT = f"SELECT {', '.join(TOKEN_COLS)} FROM api_tokens"


# ---- audit log and ownership history -----------------------------------------------------------
def op_add_audit(dialect: Dialect, entries: Sequence[AuditEntry]) -> Op[None]:
    rows = [(e.ts, e.actor, e.action, e.app, e.target, e.outcome, e.detail, e.via) for e in entries]
    yield Stmt(dialect.insert("audit_log", AUDIT_COLS, len(rows)), flat(rows))


def newest_first(table: str, cols: Sequence[str], app: str | None, before_id: int | None,
                 limit: int) -> tuple[str, list[Any]]:
    """A page of an append-only table, newest first, of one app if given."""
    sql = f"SELECT {', '.join(cols)}, id FROM {table} WHERE 1 = 1"
    params: list[Any] = []
    if app is not None:
        sql += " AND app = ?"
        params.append(app)
    if before_id is not None:
        sql += " AND id < ?"
        params.append(before_id)
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(max(limit, 0))
    return sql, params


def row_to_audit(r: Sequence[Any]) -> AuditEntry:
    return AuditEntry(float(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7], int(r[8]))


def row_to_change(r: Sequence[Any]) -> OwnershipChange:
    return OwnershipChange(r[0], r[1], r[2], int(r[3]), r[4], float(r[5]), int(r[6]))


# ---- idempotency keys ------------------------------------------------------------------------
def op_reserve_key(dialect: Dialect, app: str, key: str, now: float) -> Op[tuple[bool, int | None]]:
    yield Stmt("DELETE FROM idempotency_keys WHERE app = ? AND idem_key = ? AND created_at < ?",
               (app, key, now - IDEMPOTENCY_TTL))
    r = yield Stmt(dialect.insert("idempotency_keys", ("app", "idem_key", "created_at"), 1, ignore=True),
                   (app, key, now))
    if r.rowcount == 1:
        return True, None
    found = yield Stmt("SELECT instance_id FROM idempotency_keys WHERE app = ? AND idem_key = ?", (app, key))
    return False, (None if not found.rows or found.rows[0][0] is None else int(found.rows[0][0]))


def op_settle_key(app: str, key: str, instance_id: int | None) -> Op[None]:
    if instance_id is None:
        yield Stmt("DELETE FROM idempotency_keys WHERE app = ? AND idem_key = ?", (app, key))
    else:
        yield Stmt("UPDATE idempotency_keys SET instance_id = ? WHERE app = ? AND idem_key = ?",
                   (instance_id, app, key))


# ---- retention -------------------------------------------------------------------------------
def op_old_instances(app: str, before_ms: int, limit: int) -> Op[list[int]]:
    found = yield Stmt(f"SELECT id FROM instances WHERE app = ? AND planned_ms < ? AND status IN {SQL_FINAL}"
                       " ORDER BY planned_ms LIMIT ?", (app, before_ms, limit))
    return [int(r[0]) for r in found.rows]


def op_delete_logs_of(dialect: Dialect, instance_ids: Sequence[int], limit: int) -> Op[int]:
    """At most ``limit`` log lines of these instances (one short transaction; called until none are left)."""
    found = yield Stmt("SELECT id FROM job_logs WHERE instance_id IN " + dialect.in_list(len(instance_ids))
                       + " LIMIT ?", (*instance_ids, limit))
    ids = [int(r[0]) for r in found.rows]
    for part in chunks(ids):
        yield Stmt("DELETE FROM job_logs WHERE id IN " + dialect.in_list(len(part)), part)
    return len(ids)


def op_delete_instances(dialect: Dialect, ids: Sequence[int]) -> Op[None]:
    for part in chunks(ids):
        yield Stmt("DELETE FROM instances WHERE id IN " + dialect.in_list(len(part)), part)


def op_prune_older(dialect: Dialect, table: str, before: float, limit: int) -> Op[int]:
    column = PRUNABLE[table]  # the table and its column come from this fixed map, never from a caller's text
    if table == "idempotency_keys":  # no id: keyed by (app, key); its created_at is indexed
        r = yield Stmt(f"DELETE FROM {table} WHERE {column} < ?", (before,))
        return r.rowcount
    if table == "alarm_outbox":  # undelivered rows may lead by id: by the index on delivered_at instead
        found = yield Stmt("SELECT id FROM alarm_outbox WHERE delivered_at IS NOT NULL AND delivered_at < ?"
                           " ORDER BY delivered_at LIMIT ?", (before, limit))
        ids = [int(r[0]) for r in found.rows]
        for part in chunks(ids):
            yield Stmt("DELETE FROM alarm_outbox WHERE id IN " + dialect.in_list(len(part)), part)
        return len(ids)
    # the oldest rows by id (the primary key: a bounded read, where "WHERE ts < ?" would scan the
    # whole table whenever nothing is old); ids follow time, so old rows come first
    found = yield Stmt(f"SELECT id, {column} FROM {table} ORDER BY id LIMIT ?", (limit,))
    ids = [int(r[0]) for r in found.rows if r[1] is not None and float(r[1]) < before]
    for part in chunks(ids):
        yield Stmt(f"DELETE FROM {table} WHERE id IN " + dialect.in_list(len(part)), part)
    return len(ids)


# ---- the alarm outbox ------------------------------------------------------------------------
ALARM_COLS = ("event_id", "webhook", "app", "payload", "created_at", "next_attempt_at", "attempts")


def op_add_alarms(dialect: Dialect, alarms: Sequence[AlarmRow]) -> Op[None]:
    rows = [(a.event_id, a.webhook, a.app, dumps(a.payload), a.created_at, a.next_attempt_at or a.created_at, 0)
            for a in alarms]
    for part in chunks(rows, 500):
        yield Stmt(dialect.insert("alarm_outbox", ALARM_COLS, len(part), ignore=True), flat(part))


def op_claim_alarms(dialect: Dialect, server_id: str, apps: Collection[str], now: float, lease: float,
                    limit: int, webhooks: Collection[str] | None) -> Op[list[AlarmRow]]:
    listed = sorted(apps) if len(apps) <= 500 else []  # more: filtered below, not in the statement
    where = f"(app IN {dialect.in_list(len(listed))} OR app IS NULL)" if listed else (
        "app IS NULL" if not apps else "1 = 1")
    hooks = sorted(webhooks) if webhooks is not None else []
    if webhooks is not None:
        where += f" AND webhook IN {dialect.in_list(len(hooks))}" if hooks else " AND 1 = 0"
    found = yield Stmt(f"SELECT id, {', '.join(ALARM_COLS)} FROM alarm_outbox WHERE delivered_at IS NULL"
                       f" AND next_attempt_at <= ? AND (claimed_until IS NULL OR claimed_until < ?)"
                       f" AND {where} ORDER BY id LIMIT ?", (now, now, *listed, *hooks, limit))
    won: list[AlarmRow] = []
    for r in found.rows:
        if r[3] is not None and r[3] not in apps:
            continue
        claimed = yield Stmt("UPDATE alarm_outbox SET claimed_by = ?, claimed_until = ? WHERE id = ?"
                             " AND delivered_at IS NULL AND (claimed_until IS NULL OR claimed_until < ?)",
                             (server_id, now + lease, r[0], now))
        if claimed.rowcount == 1:
            won.append(AlarmRow(r[1], r[2], r[3], loads(r[4]), float(r[5]), float(r[6]), int(r[7]), int(r[0])))
    return won


def op_finish_alarm(alarm_id: int, now: float, delivered: bool, next_attempt_at: float, error: str | None,
                    claimed_by: str) -> Op[None]:
    if delivered:
        yield Stmt("UPDATE alarm_outbox SET delivered_at = ?, claimed_until = NULL, last_error = ? WHERE id = ?"
                   " AND claimed_by = ?", (now, error, alarm_id, claimed_by))
    else:
        yield Stmt("UPDATE alarm_outbox SET attempts = attempts + 1, next_attempt_at = ?, claimed_until = NULL,"
                   " last_error = ? WHERE id = ? AND claimed_by = ?", (next_attempt_at, error, alarm_id, claimed_by))
