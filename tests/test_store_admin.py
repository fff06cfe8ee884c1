"""The admin API's part of the store contract, on every backend (SQLite, MariaDB, memory)."""
from __future__ import annotations

import pytest
from test_store import NOW, make_store, owned, spec, store, store_url  # noqa: F401 (fixtures)

from fastjob.models import InstanceUpdate, Status
from fastjob.server.auth import new_token_row
from fastjob.store import AuditEntry, OwnershipChange, Store
from fastjob.store.base import IDEMPOTENCY_TTL

pytestmark = pytest.mark.asyncio


async def _fires(store: Store, planned: list[int]) -> list[int]:
    epoch = await owned(store)
    job = await store.upsert_job(spec("j", schedule_type="api", schedule_expr=""), None, NOW)
    ids = []
    for t in planned:
        row = await store.insert_instance("s1", "app", epoch, job.id, t, 1, "api", None, NOW)
        assert row is not None
        ids.append(row.id)
    return ids


async def test_query_instances_pages_by_planned_time_with_a_stable_cursor(store):
    ids = await _fires(store, [3000, 1000, 2000, 2000 + 0, 4000][:4] + [5000])
    rows = await store.query_instances("app", limit=2)
    assert [r.planned_ms for r in rows] == [5000, 3000]
    after = (rows[-1].planned_ms, rows[-1].id)
    rest = await store.query_instances("app", after=after, limit=10)
    assert [r.planned_ms for r in rest] == [2000, 1000]
    assert {r.id for r in rows + rest} == set(ids)
    window = await store.query_instances("app", since_ms=2000, until_ms=5000)
    assert [r.planned_ms for r in window] == [3000, 2000]
    await store.update_instances([InstanceUpdate(ids[0], Status.SUCCEEDED, started_at=3.5, finished_at=4.0)])
    assert [r.id for r in await store.query_instances("app", statuses=[Status.SUCCEEDED])] == [ids[0]]
    assert await store.query_instances("app", statuses=[]) == []
    assert await store.query_instances("other") == []


async def test_instance_counts_and_lateness(store):
    ids = await _fires(store, [1000, 1500, 2500, 9000])
    await store.update_instances([InstanceUpdate(ids[0], Status.SUCCEEDED, started_at=1.25, finished_at=2.0),
                                  InstanceUpdate(ids[1], Status.FAILED, started_at=1.5, finished_at=2.0)])
    counts = await store.instance_counts("app", 1000, 5000, 1000)
    assert sorted(counts) == [(1000, "failed", 1), (1000, "succeeded", 1), (2000, "waiting", 1)]
    assert sorted(await store.lateness_sample("app", 0, 10_000, 10)) == [0.0, 0.25]
    assert await store.lateness_sample("app", 0, 10_000, 1) == [0.0]  # the latest planned first


async def test_tokens_are_stored_hashed_and_revoked_once(store):
    secret_token, row = new_token_row("ci", "operator", ["billing"], NOW + 60)
    await store.add_token(row)
    got = await store.get_token(row.id)
    assert got == row and secret_token.split("_", 2)[2] not in repr(got)
    assert [t.id for t in await store.list_tokens()] == [row.id]
    assert await store.revoke_token(row.id, NOW) is True
    assert await store.revoke_token(row.id, NOW) is False
    assert (await store.get_token(row.id)).revoked_at == NOW
    assert await store.get_token("nope") is None


async def test_audit_and_history_newest_first_by_app(store):
    await store.add_audit([AuditEntry(NOW + i, "ann", "job.create", "a" if i % 2 else "b", f"j{i}", "ok")
                           for i in range(5)])
    everything = await store.list_audit(limit=10)
    assert [e.target for e in everything] == ["j4", "j3", "j2", "j1", "j0"]
    only_a = await store.list_audit(app="a", limit=1)
    assert [e.target for e in only_a] == ["j3"]
    assert [e.target for e in await store.list_audit(app="a", before_id=only_a[0].id)] == ["j1"]
    for epoch in (1, 2):
        await store.add_ownership_change(OwnershipChange("a", None, f"s{epoch}", epoch, "claimed", NOW + epoch))
    changes = await store.list_ownership_changes(app="a")
    assert [(c.to_server, c.epoch) for c in changes] == [("s2", 2), ("s1", 1)]
    assert await store.list_ownership_changes(app="b") == []


async def test_idempotency_keys_reserve_once_and_expire(store):
    assert await store.reserve_idempotency_key("app", "k", NOW) == (True, None)
    assert await store.reserve_idempotency_key("app", "k", NOW + 1) == (False, None)  # in progress
    await store.settle_idempotency_key("app", "k", 42)
    assert await store.reserve_idempotency_key("app", "k", NOW + 2) == (False, 42)
    assert await store.reserve_idempotency_key("other", "k", NOW) == (True, None)  # keys are per app
    await store.settle_idempotency_key("other", "k", None)  # the trigger failed: the key is free again
    assert await store.reserve_idempotency_key("other", "k", NOW) == (True, None)
    assert await store.reserve_idempotency_key("app", "k", NOW + IDEMPOTENCY_TTL + 10) == (True, None)
