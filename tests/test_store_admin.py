"""The admin API's part of the store contract, on every backend (SQLite, MariaDB, memory)."""
from __future__ import annotations

import pytest
from test_store import NOW, make_store, owned, spec, store, store_url  # noqa: F401 (fixtures)

from fastjob.models import InstanceUpdate, LogLine, Status
from fastjob.server.auth import new_token_row
from fastjob.store import AuditEntry, OwnershipChange, Store
from fastjob.store.base import IDEMPOTENCY_TTL, AlarmRow

pytestmark = pytest.mark.asyncio


@pytest.fixture
def db(store: Store) -> Store:  # noqa: F811 (test_store's fixture, over every backend)
    return store


async def _fires(db: Store, planned: list[int]) -> list[int]:
    epoch = await owned(db)
    job = await db.upsert_job(spec("j", schedule_type="api", schedule_expr=""), None, NOW)
    ids = []
    for t in planned:
        row = await db.insert_instance("s1", "app", epoch, job.id, t, 1, "api", None, NOW)
        assert row is not None
        ids.append(row.id)
    return ids


async def test_query_instances_pages_by_planned_time_with_a_stable_cursor(db):
    ids = await _fires(db, [3000, 1000, 2000, 2000 + 0, 4000][:4] + [5000])
    rows = await db.query_instances("app", limit=2)
    assert [r.planned_ms for r in rows] == [5000, 3000]
    after = (rows[-1].planned_ms, rows[-1].id)
    rest = await db.query_instances("app", after=after, limit=10)
    assert [r.planned_ms for r in rest] == [2000, 1000]
    assert {r.id for r in rows + rest} == set(ids)
    window = await db.query_instances("app", since_ms=2000, until_ms=5000)
    assert [r.planned_ms for r in window] == [3000, 2000]
    await db.update_instances([InstanceUpdate(ids[0], Status.SUCCEEDED, started_at=3.5, finished_at=4.0)])
    assert [r.id for r in await db.query_instances("app", statuses=[Status.SUCCEEDED])] == [ids[0]]
    assert await db.query_instances("app", statuses=[]) == []
    assert await db.query_instances("other") == []


async def test_instance_counts_and_lateness(db):
    ids = await _fires(db, [1000, 1500, 2500, 9000])
    await db.update_instances([InstanceUpdate(ids[0], Status.SUCCEEDED, started_at=1.25, finished_at=2.0),
                                  InstanceUpdate(ids[1], Status.FAILED, started_at=1.5, finished_at=2.0)])
    counts = await db.instance_counts("app", 1000, 5000, 1000)
    assert sorted(counts) == [(1000, "failed", 1), (1000, "succeeded", 1), (2000, "waiting", 1)]
    assert sorted(await db.lateness_sample("app", 0, 10_000, 10)) == [0.0, 0.25]
    assert await db.lateness_sample("app", 0, 10_000, 1) == [0.0]  # the latest planned first


async def test_tokens_are_stored_hashed_and_revoked_once(db):
    secret_token, row = new_token_row("ci", "operator", ["billing"], NOW + 60)
    await db.add_token(row)
    got = await db.get_token(row.id)
    assert got == row and secret_token.split("_", 2)[2] not in repr(got)
    assert [t.id for t in await db.list_tokens()] == [row.id]
    assert await db.revoke_token(row.id, NOW) is True
    assert await db.revoke_token(row.id, NOW) is False
    assert (await db.get_token(row.id)).revoked_at == NOW
    assert await db.get_token("nope") is None


async def test_audit_and_history_newest_first_by_app(db):
    await db.add_audit([AuditEntry(NOW + i, "ann", "job.create", "a" if i % 2 else "b", f"j{i}", "ok")
                           for i in range(5)])
    everything = await db.list_audit(limit=10)
    assert [e.target for e in everything] == ["j4", "j3", "j2", "j1", "j0"]
    only_a = await db.list_audit(app="a", limit=1)
    assert [e.target for e in only_a] == ["j3"]
    assert [e.target for e in await db.list_audit(app="a", before_id=only_a[0].id)] == ["j1"]
    for epoch in (1, 2):
        await db.add_ownership_change(OwnershipChange("a", None, f"s{epoch}", epoch, "claimed", NOW + epoch))
    changes = await db.list_ownership_changes(app="a")
    assert [(c.to_server, c.epoch) for c in changes] == [("s2", 2), ("s1", 1)]
    assert await db.list_ownership_changes(app="b") == []


async def test_idempotency_keys_reserve_once_and_expire(db):
    assert await db.reserve_idempotency_key("app", "k", NOW) == (True, None)
    assert await db.reserve_idempotency_key("app", "k", NOW + 1) == (False, None)  # in progress
    await db.settle_idempotency_key("app", "k", 42)
    assert await db.reserve_idempotency_key("app", "k", NOW + 2) == (False, 42)
    assert await db.reserve_idempotency_key("other", "k", NOW) == (True, None)  # keys are per app
    await db.settle_idempotency_key("other", "k", None)  # the trigger failed: the key is free again
    assert await db.reserve_idempotency_key("other", "k", NOW) == (True, None)
    assert await db.reserve_idempotency_key("app", "k", NOW + IDEMPOTENCY_TTL + 10) == (True, None)


async def test_job_names_of_a_page(db):
    await owned(db)
    a = await db.upsert_job(spec("a"), None, NOW)
    b = await db.upsert_job(spec("b"), None, NOW)
    other = await db.upsert_job(spec("c", app="other"), None, NOW)
    assert await db.job_names("app", [a.id, b.id, other.id, 999]) == {a.id: "a", b.id: "b"}
    assert await db.job_names("app", []) == {}


async def test_retention_prunes_old_finished_rows_and_keeps_the_rest(db):
    ids = await _fires(db, [1000, 2000, 3000, 500])  # the last: the oldest, and unfinished
    await db.update_instances([InstanceUpdate(i, Status.SUCCEEDED, started_at=1.0, finished_at=2.0) for i in ids[:3]])
    await db.append_logs([LogLine(i, NOW + n, "INFO", f"line {n}") for n, i in enumerate(ids)])
    assert await db.prune_instances("app", 3500, limit=2) == 2  # the oldest first, a batch at a time
    assert await db.prune_instances("app", 3500, limit=2) == 1
    assert await db.prune_instances("app", 3500, limit=2) == 0
    left = await db.query_instances("app")
    assert [r.id for r in left] == [ids[3]]  # unfinished: never pruned, however old
    assert await db.get_logs(ids[0]) == [] and len(await db.get_logs(ids[3])) == 1
    assert await db.prune_older("job_logs", NOW + 10, 100) == 1  # the survivor's line is old too
    await db.add_audit([AuditEntry(NOW - 100, "a", "x", None, "t", "ok"), AuditEntry(NOW, "a", "y", None, "t", "ok")])
    assert await db.prune_older("audit_log", NOW - 50, 100) == 1
    assert [e.action for e in await db.list_audit()] == ["y"]
    await db.add_ownership_change(OwnershipChange("a", None, "s1", 1, "claimed", NOW - 100))
    assert await db.prune_older("app_history", NOW - 50, 100) == 1
    await db.reserve_idempotency_key("app", "k", NOW - 100)
    assert await db.prune_older("idempotency_keys", NOW - 50, 100) == 1


async def test_query_jobs_pages_and_filters_in_the_store(db):
    await owned(db)
    for name, tags, enabled in [("a_x", ["red"], True), ("b%", ["blue"], False), ("c_x", ["red", "blue"], True)]:
        await db.upsert_job(spec(name, tags=tags, enabled=enabled), None, NOW)
    await db.upsert_job(spec("zz", app="other"), None, NOW)
    assert [j.name for j in await db.query_jobs("app", limit=2)] == ["a_x", "b%"]
    assert [j.name for j in await db.query_jobs("app", after="b%")] == ["c_x"]
    assert [j.name for j in await db.query_jobs("app", name_contains="_x")] == ["a_x", "c_x"]
    assert [j.name for j in await db.query_jobs("app", name_contains="%")] == ["b%"]  # a literal, not a pattern
    assert [j.name for j in await db.query_jobs("app", tag="blue")] == ["b%", "c_x"]
    assert [j.name for j in await db.query_jobs("app", enabled=False)] == ["b%"]


async def test_the_alarm_outbox_hands_each_alarm_to_one_sender(db):
    ids = await _fires(db, [1000])
    first = AlarmRow("failed:1:1", "w1", "app", {"event": "failed"}, NOW)
    # written with the status that raised it, in one transaction
    await db.write_statuses([InstanceUpdate(ids[0], Status.FAILED, finished_at=NOW)], [], {}, [first])
    await db.add_alarms([first, AlarmRow("takeover:app:2", "w1", None, {"event": "takeover"}, NOW)])  # a repeat
    cluster = await db.claim_alarms("s2", [], NOW, 30, 10)  # a cluster alarm: any server
    assert [a.event_id for a in cluster] == ["takeover:app:2"]
    await db.finish_alarm(cluster[0].id, NOW, True, 0, None, "s2")
    mine = await db.claim_alarms("s1", ["app"], NOW, 30, 10)
    assert [a.event_id for a in mine] == ["failed:1:1"] and mine[0].payload == {"event": "failed"}
    assert await db.claim_alarms("s2", ["app"], NOW + 1, 30, 10) == []  # claimed for 30 s
    await db.finish_alarm(mine[0].id, NOW + 1, False, NOW + 5, "HTTP 500", "s1")
    assert await db.claim_alarms("s1", ["app"], NOW + 2, 30, 10) == []  # not due again yet
    again = await db.claim_alarms("s1", ["app"], NOW + 6, 30, 10)
    assert [a.attempts for a in again] == [1]
    await db.finish_alarm(again[0].id, NOW + 6, True, 0, None, "s1")
    assert await db.claim_alarms("s1", ["app"], NOW + 100, 30, 10) == []  # delivered: never again
    assert await db.prune_older("alarm_outbox", NOW + 7, 100) == 2  # both delivered by then
    assert await db.claim_alarms("s1", ["other"], NOW + 100, 30, 10) == []


async def test_job_outcomes_count_a_page_of_jobs_by_status(db):
    ids = await _fires(db, [1000, 2000, 3000])
    await db.update_instances([InstanceUpdate(ids[0], Status.SUCCEEDED, finished_at=NOW),
                               InstanceUpdate(ids[1], Status.FAILED, finished_at=NOW)])
    job_id = (await db.get_instance(ids[0])).job_id
    assert await db.job_outcomes("app", [job_id, 999], 0) == {job_id: {"succeeded": 1, "failed": 1, "waiting": 1}}
    assert await db.job_outcomes("app", [job_id], 2500) == {job_id: {"waiting": 1}}
    assert await db.job_outcomes("other", [job_id], 0) == {}
