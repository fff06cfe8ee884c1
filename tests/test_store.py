"""One contract suite for every store backend (SQLite file, MySQL/MariaDB).

The ``store`` fixture is parametrized over both backends; the MySQL half uses ``mysql_dsn``
from conftest (skips without FASTJOB_TEST_MYSQL_DSN unless FASTJOB_REQUIRE_MYSQL=1).
"""
from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import time
from typing import AsyncIterator, Awaitable, Callable, Optional

import pytest

from fastjob.store import (
    InstanceUpdate,
    JobRow,
    JobSpec,
    LogLine,
    NotOwnerError,
    ScheduleType,
    Status,
    Store,
    StoreError,
    create_store,
)
from fastjob.store._common import FIRST_ATTEMPT
from fastjob.store.schema import LATEST_VERSION

BACKENDS = ["sqlite", "mysql"]
NOW = 1_700_000_000.0


def every(ms: int) -> Callable[[JobRow, int], Optional[int]]:
    """A fixed-rate next_fire."""
    return lambda job, t: t + ms


def no_more(job: JobRow, t: int) -> Optional[int]:
    return None


def spec(name: str = "j1", app: str = "app", **kw) -> JobSpec:
    kw.setdefault("schedule_type", ScheduleType.FIXED_RATE)
    kw.setdefault("schedule_expr", "1")
    return JobSpec(app=app, name=name, handler=kw.pop("handler", "mod:func"), **kw)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fastjob.db"
    return request.getfixturevalue("mysql_dsn")


@pytest.fixture
async def make_store(store_url: str) -> AsyncIterator[Callable[..., Awaitable[Store]]]:
    """Opens extra stores (own connections) on the same database; all closed at teardown."""
    opened: list[Store] = []

    async def make(open_: bool = True, **kw) -> Store:
        s = create_store(store_url)
        for k, v in kw.items():
            setattr(s, k, v)
        opened.append(s)
        if open_:
            await s.open()
        return s

    yield make
    for s in opened:
        await s.close()


@pytest.fixture
async def store(make_store) -> Store:
    return await make_store()


async def raw(store: Store, sql: str, params=()) -> list[tuple]:
    """Read-only peek under the store (test helper)."""
    return await store._run("raw", lambda: store._op_query(sql, params), tx=False)  # type: ignore[attr-defined]


async def owned(store: Store, app: str = "app", server: str = "s1") -> int:
    row = await store.ensure_app(app)
    epoch = await store.claim_app(app, server, row.epoch)
    assert epoch is not None
    return epoch


# ---- lifecycle & migrations ------------------------------------------------------------
async def test_open_is_idempotent(store: Store, make_store) -> None:
    assert (await raw(store, "SELECT version FROM schema_version"))[0][0] == LATEST_VERSION
    again = await make_store()  # a second open of a migrated database is a no-op
    await again.open()
    assert (await raw(again, "SELECT COUNT(*) FROM schema_version"))[0][0] == 1
    await store.close()
    await store.close()  # safe twice


async def test_concurrent_migrations(make_store) -> None:
    stores = [await make_store(open_=False) for _ in range(5)]
    await asyncio.gather(*(s.open() for s in stores))
    for s in stores:
        assert (await raw(s, "SELECT id, version FROM schema_version")) == [(1, LATEST_VERSION)]
    await stores[0].ensure_app("a")
    assert [a.name for a in await stores[4].list_apps()] == ["a"]


# ---- servers ---------------------------------------------------------------------------
async def test_servers(store: Store) -> None:
    await store.register_server("s1", "10.0.0.1:7700", NOW)
    await store.register_server("s2", "10.0.0.2:7700", NOW)
    assert await store.heartbeat_server("s1", NOW + 5)
    assert await store.heartbeat_server("s1", NOW + 5)  # same value again still counts
    assert not await store.heartbeat_server("ghost", NOW)
    rows = {s.id: s for s in await store.list_servers()}
    assert rows["s1"].heartbeat_at == NOW + 5 and rows["s1"].address == "10.0.0.1:7700"
    await store.register_server("s1", "10.0.0.9:7700", NOW + 9)  # re-register refreshes
    rows = {s.id: s for s in await store.list_servers()}
    assert rows["s1"].address == "10.0.0.9:7700" and rows["s1"].started_at == NOW + 9
    await store.remove_server("s2")
    assert [s.id for s in await store.list_servers()] == ["s1"]


# ---- apps ------------------------------------------------------------------------------
async def test_apps_claim_release_token(store: Store) -> None:
    assert await store.get_app("a") is None
    row = await store.ensure_app("a")
    assert (row.owner, row.epoch) == (None, 0)
    assert (await store.ensure_app("a")).epoch == 0
    assert await store.claim_app("a", "s1", 0) == 1
    assert await store.claim_app("a", "s2", 0) is None  # stale seen epoch loses
    assert await store.claim_app("a", "s2", 1) == 2  # takeover
    await store.ensure_app("b")
    assert await store.claim_app("b", "s2", 0) == 1
    await store.ensure_app("c")
    assert sorted(await store.release_apps("s2")) == ["a", "b"]
    apps = {a.name: a for a in await store.list_apps()}
    assert (apps["a"].owner, apps["a"].epoch) == (None, 3)
    assert (apps["b"].owner, apps["b"].epoch) == (None, 2)
    assert (apps["c"].owner, apps["c"].epoch) == (None, 0)
    assert await store.release_apps("s2") == []
    await store.set_app_token("a", "hash1")
    assert (await store.get_app("a")).token_hash == "hash1"
    await store.set_app_token("a", None)
    assert (await store.get_app("a")).token_hash is None
    await store.set_app_token("new", "h")  # creates the app row if missing
    assert (await store.get_app("new")).token_hash == "h"


async def test_concurrent_claimers_exactly_one_wins(store: Store, make_store) -> None:
    await store.ensure_app("race")
    others = await asyncio.gather(*(make_store() for _ in range(10)))
    results = await asyncio.gather(*(s.claim_app("race", f"s{i}", 0) for i, s in enumerate(others)))
    winners = [i for i, r in enumerate(results) if r is not None]
    assert len(winners) == 1 and results[winners[0]] == 1
    row = await store.get_app("race")
    assert (row.owner, row.epoch) == (f"s{winners[0]}", 1)


async def test_concurrent_ensure_app(make_store) -> None:
    stores = await asyncio.gather(*(make_store() for _ in range(5)))
    rows = await asyncio.gather(*(s.ensure_app("x") for s in stores))
    assert {(r.name, r.epoch) for r in rows} == {("x", 0)}


# ---- jobs --------------------------------------------------------------------------------
async def test_job_upsert_get_list_delete(store: Store) -> None:
    j = await store.upsert_job(spec("b", params={"k": [1, 2]}, tags=["gpu"], timeout=2.5), 1000, NOW)
    assert j.id > 0 and j.version == 1 and j.next_trigger_ms == 1000 and j.params == {"k": [1, 2]}
    assert (j.tags, j.timeout, j.enabled, j.is_delete, j.created_time) == (["gpu"], 2.5, True, False, NOW)
    assert (await store.get_job(j.id)) == j
    assert (await store.get_job_by_name("app", "b")) == j
    await store.upsert_job(spec("a"), 5, NOW)
    assert [x.name for x in await store.list_jobs("app")] == ["a", "b"]
    assert await store.list_jobs("other") == []

    same = await store.upsert_job(spec("b", params={"k": [1, 2]}, tags=["gpu"], timeout=2.5), 9999, NOW + 1)
    assert (same.version, same.next_trigger_ms, same.updated_time) == (1, 1000, NOW)  # unchanged: kept

    handler = await store.upsert_job(spec("b", handler="m:g", params={"k": [1, 2]}, tags=["gpu"], timeout=2.5), 9999, NOW + 2)
    assert (handler.version, handler.next_trigger_ms, handler.handler) == (2, 1000, "m:g")  # not a schedule change

    sched = await store.upsert_job(spec("b", schedule_expr="5", handler="m:g"), 7000, NOW + 3)
    assert (sched.version, sched.next_trigger_ms, sched.schedule_expr, sched.id) == (3, 7000, "5", j.id)
    assert (await raw(store, "SELECT `interval` FROM jobs WHERE id = ?", (j.id,)))[0][0] == "5"

    assert await store.delete_job("app", "b", NOW + 4)
    assert not await store.delete_job("app", "b", NOW + 4)
    assert await store.get_job_by_name("app", "b") is None
    gone = await store.get_job(j.id)
    assert gone.is_delete and not gone.enabled and gone.next_trigger_ms is None and gone.version == 4
    assert [x.name for x in await store.list_jobs("app")] == ["a"]

    revived = await store.upsert_job(spec("b", schedule_expr="5", handler="m:g"), 8000, NOW + 5)
    assert (revived.id, revived.is_delete, revived.next_trigger_ms, revived.version) == (j.id, False, 8000, 5)


async def test_job_enable_finish_stats_cron_interval(store: Store) -> None:
    j = await store.upsert_job(spec("c", schedule_type=ScheduleType.CRON, schedule_expr="*/5 * * * *"), 100, NOW)
    assert (await raw(store, "SELECT `interval` FROM jobs WHERE id = ?", (j.id,)))[0][0] is None
    assert await store.set_job_enabled("app", "c", False, None, NOW + 1)
    off = await store.get_job(j.id)
    assert (off.enabled, off.next_trigger_ms, off.version) == (False, None, 2)
    assert await store.set_job_enabled("app", "c", True, 500, NOW + 2)
    assert (await store.get_job(j.id)).next_trigger_ms == 500
    assert not await store.set_job_enabled("app", "nope", True, 1, NOW)
    await store.mark_job_finished(j.id, NOW + 10)
    await store.set_job_stats(j.id, {"runs": 3, "failures": 1}, NOW + 11)
    got = await store.get_job(j.id)
    assert (got.last_finished_time, got.stats) == (NOW + 10, {"runs": 3, "failures": 1})
    # re-enabling through upsert gives the job a fresh next fire
    await store.set_job_enabled("app", "c", False, None, NOW + 12)
    back = await store.upsert_job(spec("c", schedule_type=ScheduleType.CRON, schedule_expr="*/5 * * * *"), 900, NOW + 13)
    assert (back.enabled, back.next_trigger_ms) == (True, 900)


async def test_concurrent_upsert_same_job(make_store) -> None:
    stores = await asyncio.gather(*(make_store() for _ in range(4)))
    rows = await asyncio.gather(*(s.upsert_job(spec("dup", params=i), 10, NOW) for i, s in enumerate(stores)))
    assert len({r.id for r in rows}) == 1
    assert len(await stores[0].list_jobs("app")) == 1


# ---- the WAL -----------------------------------------------------------------------------
async def test_claim_due_writes_each_fire_and_advances(store: Store) -> None:
    epoch = await owned(store)
    a = await store.upsert_job(spec("a", params={"p": 1}), 1000, NOW)
    b = await store.upsert_job(spec("b"), 2500, NOW)
    late = await store.upsert_job(spec("late"), 9000, NOW)
    rows = await store.claim_due("s1", "app", epoch, 3000, every(1000), NOW)
    got = sorted((r.job_id, r.planned_ms) for r in rows)
    assert got == [(a.id, 1000), (a.id, 2000), (a.id, 3000), (b.id, 2500)]
    for r in rows:
        assert (r.status, r.attempt, r.trigger, r.server, r.epoch, r.app) == (Status.WAITING, FIRST_ATTEMPT, "schedule", "s1", epoch, "app")
        assert r.created_at == NOW and r.id > 0
    assert [r.params for r in rows] == [None] * 4  # scheduled fires use the job's params
    assert (await store.get_job(a.id)).next_trigger_ms == 4000
    assert (await store.get_job(b.id)).next_trigger_ms == 3500
    assert (await store.get_job(late.id)).next_trigger_ms == 9000
    assert await store.claim_due("s1", "app", epoch, 3000, every(1000), NOW) == []  # nothing due again
    assert (await store.get_instance(rows[0].id)) == rows[0]


async def test_claim_due_skips_duplicates_limit_exclude(store: Store) -> None:
    epoch = await owned(store)
    a = await store.upsert_job(spec("a"), 1000, NOW)
    c = await store.upsert_job(spec("cron", schedule_type=ScheduleType.CRON, schedule_expr="* * * * *"), 1000, NOW)
    off = await store.upsert_job(spec("off", enabled=False), 1000, NOW)
    gone = await store.upsert_job(spec("gone"), 1000, NOW)
    await store.delete_job("app", "gone", NOW)
    other = await owned(store, app="other")
    o = await store.upsert_job(spec("a", app="other"), 1000, NOW)

    # a fire already in the WAL is skipped, but the job still advances past it
    pre = await store.insert_instance("s1", "app", epoch, a.id, 2000, FIRST_ATTEMPT, "schedule", None, NOW)
    assert pre is not None
    rows = await store.claim_due("s1", "app", epoch, 3000, every(1000), NOW, exclude_types=[ScheduleType.CRON])
    assert sorted(r.planned_ms for r in rows) == [1000, 3000] and {r.job_id for r in rows} == {a.id}
    assert (await store.get_job(a.id)).next_trigger_ms == 4000
    assert (await store.get_job(c.id)).next_trigger_ms == 1000  # excluded type untouched
    assert (await store.get_job(off.id)).next_trigger_ms == 1000  # disabled: not claimed
    assert (await store.get_job(o.id)).next_trigger_ms == 1000  # other app untouched
    assert (await store.get_job(gone.id)).next_trigger_ms is None

    # limit: stops mid-job; the next claim carries on from the first unwritten fire
    rows = await store.claim_due("s1", "app", epoch, 10_000, every(1000), NOW, limit=4)
    assert len(rows) == 4
    rows2 = await store.claim_due("s1", "app", epoch, 10_000, every(1000), NOW, limit=100)
    planned_a = sorted(r.planned_ms for r in rows + rows2 if r.job_id == a.id)
    assert planned_a == list(range(4000, 10_001, 1000))
    assert [r.planned_ms for r in rows + rows2 if r.job_id == c.id] == list(range(1000, 10_001, 1000))
    assert (await store.get_job(a.id)).next_trigger_ms == 11_000
    assert other == 1


async def test_claim_due_next_fire_none_clears(store: Store) -> None:
    epoch = await owned(store)
    j = await store.upsert_job(spec("once", schedule_type=ScheduleType.ONCE, schedule_expr="1000"), 1000, NOW)
    rows = await store.claim_due("s1", "app", epoch, 5000, no_more, NOW)
    assert [(r.job_id, r.planned_ms) for r in rows] == [(j.id, 1000)]
    assert (await store.get_job(j.id)).next_trigger_ms is None
    assert await store.claim_due("s1", "app", epoch, 50_000, no_more, NOW) == []


async def test_claim_due_many_jobs_chunked(store: Store) -> None:
    epoch = await owned(store)
    for i in range(30):
        await store.upsert_job(spec(f"j{i:02d}"), 1000 + i % 10, NOW)
    # 30 jobs x 100 fires = 3000 rows: more than one multi-row chunk
    rows = await store.claim_due("s1", "app", epoch, 1999, every(10), NOW, limit=10_000)
    assert len(rows) == 3000 and len({r.id for r in rows}) == 3000
    assert all(j.next_trigger_ms == 2000 + int(j.name[1:]) % 10 for j in await store.list_jobs("app"))


async def test_stale_owner_is_fenced(store: Store, make_store) -> None:
    other = await make_store()
    e1 = await owned(store, server="old")
    j = await store.upsert_job(spec("a"), 1000, NOW)
    e2 = await other.claim_app("app", "new", e1)  # takeover
    assert e2 == e1 + 1
    with pytest.raises(NotOwnerError) as info:
        await store.claim_due("old", "app", e1, 5000, every(1000), NOW)
    assert (info.value.app, info.value.epoch) == ("app", e1)
    assert await store.list_instances("app") == []
    assert (await store.get_job(j.id)).next_trigger_ms == 1000
    with pytest.raises(NotOwnerError):
        await store.insert_instance("old", "app", e1, j.id, 1000, 1, "api", None, NOW)
    with pytest.raises(NotOwnerError):
        await store.set_next_trigger("old", "app", e1, j.id, 123)
    with pytest.raises(NotOwnerError):  # right epoch, wrong server
        await store.claim_due("old", "app", e2, 5000, every(1000), NOW)
    assert (await store.get_job(j.id)).next_trigger_ms == 1000
    # the new owner claims normally, the stale and the new call racing change nothing
    results = await asyncio.gather(
        store.claim_due("old", "app", e1, 5000, every(1000), NOW),
        other.claim_due("new", "app", e2, 5000, every(1000), NOW),
        return_exceptions=True,
    )
    assert isinstance(results[0], NotOwnerError)
    assert sorted(r.planned_ms for r in results[1]) == [1000, 2000, 3000, 4000, 5000]
    await other.set_next_trigger("new", "app", e2, j.id, 123)
    assert (await store.get_job(j.id)).next_trigger_ms == 123


async def test_concurrent_claim_due_same_owner_no_double_fire(store: Store, make_store) -> None:
    epoch = await owned(store)
    for i in range(20):
        await store.upsert_job(spec(f"j{i}"), 1000, NOW)
    stores = [store] + list(await asyncio.gather(*(make_store() for _ in range(3))))
    results = await asyncio.gather(*(s.claim_due("s1", "app", epoch, 5000, every(1000), NOW) for s in stores))
    all_rows = [r for rows in results for r in rows]
    assert len(all_rows) == 20 * 5
    assert len({(r.job_id, r.planned_ms, r.attempt) for r in all_rows}) == 100


async def test_insert_instance_and_duplicate(store: Store) -> None:
    epoch = await owned(store)
    j = await store.upsert_job(spec("a", schedule_type=ScheduleType.API, schedule_expr=""), None, NOW)
    row = await store.insert_instance("s1", "app", epoch, j.id, 5000, 1, "api", {"x": "y"}, NOW)
    assert row is not None and (row.status, row.trigger, row.params, row.attempt) == (Status.WAITING, "api", {"x": "y"}, 1)
    assert await store.insert_instance("s1", "app", epoch, j.id, 5000, 1, "api", None, NOW + 1) is None
    retry = await store.insert_instance("s1", "app", epoch, j.id, 5000, 2, "retry", None, NOW + 2)
    assert retry is not None and retry.attempt == 2 and retry.id != row.id


async def test_update_instances_monotonic(store: Store) -> None:
    epoch = await owned(store)
    j = await store.upsert_job(spec("a"), 1000, NOW)
    rows = await store.claim_due("s1", "app", epoch, 4000, every(1000), NOW)
    r1, r2, r3, r4 = sorted(rows, key=lambda r: r.planned_ms)
    n = await store.update_instances([
        InstanceUpdate(r1.id, Status.DISPATCHED, worker="w1", dispatched_at=NOW + 1),
        InstanceUpdate(r2.id, Status.RUNNING, worker="w2", started_at=NOW + 2),
        InstanceUpdate(r3.id, Status.CANCELLED, error="user"),
    ])
    assert n == 3
    assert await store.update_instances([InstanceUpdate(r1.id, Status.RUNNING, started_at=NOW + 3)]) == 1
    assert await store.update_instances([InstanceUpdate(r1.id, Status.SUCCEEDED, finished_at=NOW + 4, result={"ok": True})]) == 1
    # late and duplicated reports change nothing
    assert await store.update_instances([
        InstanceUpdate(r1.id, Status.RUNNING, worker="late"),
        InstanceUpdate(r1.id, Status.FAILED, error="dup"),
        InstanceUpdate(r2.id, Status.DISPATCHED, worker="late"),
        InstanceUpdate(r2.id, Status.RUNNING, worker="dup"),
        InstanceUpdate(r3.id, Status.SUCCEEDED),
        InstanceUpdate(999_999, Status.SUCCEEDED),
    ]) == 0
    got1 = await store.get_instance(r1.id)
    assert (got1.status, got1.worker, got1.dispatched_at, got1.started_at, got1.finished_at, got1.result) == (
        Status.SUCCEEDED, "w1", NOW + 1, NOW + 3, NOW + 4, {"ok": True})
    got2 = await store.get_instance(r2.id)
    assert (got2.status, got2.worker) == (Status.RUNNING, "w2")
    got3 = await store.get_instance(r3.id)
    assert (got3.status, got3.error) == (Status.CANCELLED, "user")
    # several updates of one row in one batch apply in order: the first final one sticks
    assert await store.update_instances([
        InstanceUpdate(r4.id, Status.DISPATCHED, worker="w4", dispatched_at=NOW + 5),
        InstanceUpdate(r4.id, Status.RUNNING, started_at=NOW + 6),
        InstanceUpdate(r4.id, Status.TIMED_OUT, finished_at=NOW + 7, error="timeout"),
        InstanceUpdate(r4.id, Status.SUCCEEDED, result=1),
    ]) == 1
    got4 = await store.get_instance(r4.id)
    assert (got4.status, got4.worker, got4.dispatched_at, got4.started_at, got4.finished_at, got4.error, got4.result) == (
        Status.TIMED_OUT, "w4", NOW + 5, NOW + 6, NOW + 7, "timeout", None)
    assert await store.update_instances([]) == 0
    assert j.id == r1.job_id


async def test_update_instances_big_batch(store: Store) -> None:
    epoch = await owned(store)
    await store.upsert_job(spec("a"), 0, NOW)
    rows = await store.claim_due("s1", "app", epoch, 2499, every(1), NOW, limit=5000)
    assert len(rows) == 2500
    n = await store.update_instances(InstanceUpdate(r.id, Status.SUCCEEDED, finished_at=NOW, result={"i": r.id}) for r in rows)
    assert n == 2500
    assert await store.load_unfinished("app") == []


async def test_list_and_load_unfinished(store: Store) -> None:
    epoch = await owned(store)
    a = await store.upsert_job(spec("a"), 1000, NOW)
    b = await store.upsert_job(spec("b"), 1500, NOW)
    rows = await store.claim_due("s1", "app", epoch, 3000, every(1000), NOW)
    by = {(r.job_id, r.planned_ms): r for r in rows}
    await store.update_instances([
        InstanceUpdate(by[(a.id, 1000)].id, Status.SUCCEEDED),
        InstanceUpdate(by[(b.id, 1500)].id, Status.RUNNING, worker="w"),
    ])
    unfinished = await store.load_unfinished("app")
    assert [(r.job_id, r.planned_ms) for r in unfinished] == [(b.id, 1500), (a.id, 2000), (b.id, 2500), (a.id, 3000)]
    assert await store.load_unfinished("nope") == []
    newest = await store.list_instances("app")
    assert [r.id for r in newest] == sorted((r.id for r in rows), reverse=True)
    assert len(await store.list_instances("app", limit=2)) == 2
    assert {r.planned_ms for r in await store.list_instances("app", job_id=a.id)} == {1000, 2000, 3000}
    done = await store.list_instances("app", statuses=[Status.SUCCEEDED, Status.RUNNING])
    assert {(r.job_id, r.status) for r in done} == {(a.id, Status.SUCCEEDED), (b.id, Status.RUNNING)}
    assert await store.list_instances("app", job_id=b.id, statuses=[Status.SUCCEEDED]) == []


async def test_logs(store: Store) -> None:
    await store.append_logs([LogLine(7, NOW + i, "INFO" if i % 2 else "ERROR", f"line {i} ünïcødé ✓") for i in range(1500)])
    await store.append_logs([LogLine(8, NOW, "INFO", "other")])
    await store.append_logs([])
    lines = await store.get_logs(7, limit=2000)
    assert len(lines) == 1500 and lines[0].message == "line 0 ünïcødé ✓" and lines[-1].ts == NOW + 1499
    assert [ln.message for ln in await store.get_logs(7, limit=2)] == ["line 0 ünïcødé ✓", "line 1 ünïcødé ✓"]
    assert await store.get_logs(9) == []


# ---- errors and resilience ------------------------------------------------------------------
async def test_non_transient_error_is_store_error(store: Store, store_url: str) -> None:
    j = await store.upsert_job(spec("a"), 1, NOW)
    if store_url.startswith("sqlite"):
        conn = sqlite3.connect(store_url[len("sqlite:///"):])
        conn.execute("DROP TABLE job_logs")
        conn.commit()
        conn.close()
    else:
        await store._run("drop", lambda: store._op_exec("DROP TABLE job_logs"), tx=False)  # type: ignore[attr-defined]
    with pytest.raises(StoreError) as info:
        await store.get_logs(j.id)
    assert not isinstance(info.value, NotOwnerError) and "get_logs" in str(info.value)
    assert (await store.get_job(j.id)).name == "a"  # the store still works


async def test_not_open_is_store_error(make_store) -> None:
    s = await make_store(open_=False)
    with pytest.raises(StoreError):
        await s.get_app("x")


async def test_sqlite_locked_database_is_retried(store_url: str, make_store) -> None:
    if not store_url.startswith("sqlite"):
        pytest.skip("SQLite lock contention")
    s = await make_store(busy_timeout=0.05, retry_total=5.0)
    await s.close()
    await s.open()
    blocker = sqlite3.connect(store_url[len("sqlite:///"):], isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    task = asyncio.create_task(s.ensure_app("x"))
    await asyncio.sleep(0.4)
    assert not task.done()
    blocker.execute("COMMIT")
    assert (await asyncio.wait_for(task, 5)).name == "x"
    # held past the bound: StoreError, not sqlite3.OperationalError
    s.retry_total = 0.3  # type: ignore[attr-defined]
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="unavailable"):
            await s.ensure_app("y")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (await s.ensure_app("y")).name == "y"


@pytest.mark.parametrize("returning,consecutive,json_table", [
    (True, False, False), (False, False, False), (False, True, False), (False, False, True), (False, True, True)])
async def test_inserted_id_strategies(store: Store, returning: bool, consecutive: bool, json_table: bool) -> None:
    """RETURNING, first-id + consecutive ids, and first-id + read back give the same answers,
    with the fires sent as a VALUES list or (MySQL) as one JSON_TABLE parameter."""
    from fastjob.store._common import Dialect

    d = store.dialect  # type: ignore[attr-defined]
    if d.name == "mysql":  # the probe must find this machine's MariaDB's fast paths, not fall back
        assert store.json_rows and store.json_table  # type: ignore[attr-defined]
    if returning and d.name == "mysql":
        pytest.skip("MySQL has no INSERT … RETURNING")
    if json_table and d.name != "mysql":
        pytest.skip("JSON_TABLE is MySQL/MariaDB only")
    store.dialect = Dialect(d.name, returning=returning, transactional_ddl=d.transactional_ddl)  # type: ignore[attr-defined]
    store.consecutive_ids = consecutive  # type: ignore[attr-defined]
    store.json_table = json_table  # type: ignore[attr-defined]
    epoch = await owned(store)
    a = await store.upsert_job(spec("a"), 1000, NOW)
    pre = await store.insert_instance("s1", "app", epoch, a.id, 2000, 1, "schedule", {"x": 1}, NOW)
    assert pre is not None and pre.params == {"x": 1} and pre.planned_ms == 2000
    assert await store.insert_instance("s1", "app", epoch, a.id, 2000, 1, "schedule", None, NOW) is None
    rows = await store.claim_due("s1", "app", epoch, 4000, every(1000), NOW)
    assert sorted(r.planned_ms for r in rows) == [1000, 3000, 4000]  # 2000 was a duplicate
    assert {r.id for r in rows}.isdisjoint({pre.id})
    for r in rows:
        assert await store.get_instance(r.id) == r
    b = await store.upsert_job(spec("b", params=[1]), 0, NOW)
    rows = await store.claim_due("s1", "app", epoch, 2999, every(1), NOW, limit=3000)  # 3 chunks, no dups
    assert len(rows) == 3000 and {r.job_id for r in rows} == {b.id}
    for r in rows[::997] + rows[-1:]:
        assert await store.get_instance(r.id) == r
    row = await store.insert_instance("s1", "app", epoch, b.id, 99_999, 2, "retry", {"z": None}, NOW)
    assert row is not None and await store.get_instance(row.id) == row


# ---- a real MariaDB restart (mysql only) ------------------------------------------------------
MARIADBD = "/usr/sbin/mariadbd"


def _mariadb_running() -> bool:
    return subprocess.run(["start-stop-daemon", "--status", "--exec", MARIADBD]).returncode == 0


def _mariadb_answers(dsn: str) -> bool:
    from tests.conftest import _admin_connect

    try:
        _admin_connect(dsn).close()
        return True
    except Exception:
        return False


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _start_mariadb(dsn: str) -> None:
    subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background", "--exec", MARIADBD], check=False)
    if not _wait(lambda: _mariadb_answers(dsn), 60):
        raise RuntimeError("MariaDB did not come back within 60 s")


def _restart_mariadb(dsn: str) -> None:
    """Shut the server down, wait until the process is gone, start it, wait until it answers."""
    subprocess.run(["mysqladmin", "-uroot", "-h127.0.0.1", "--connect-timeout=5", "shutdown"],
                   check=True, timeout=30, capture_output=True)
    if not _wait(lambda: not _mariadb_running(), 30):
        raise RuntimeError("MariaDB did not stop within 30 s")
    _start_mariadb(dsn)


def _revive_sync_connections() -> None:
    """The restart also killed conftest's session-long admin connection (it drops the test
    database at the end of the session): reconnect every sync PyMySQL connection in the process."""
    import gc

    import pymysql

    import warnings

    for obj in gc.get_objects():
        if isinstance(obj, pymysql.connections.Connection):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    obj.ping(reconnect=True)
            except Exception:
                pass


@pytest.mark.mysql
async def test_mariadb_restart_mid_operations(store_url: str, make_store) -> None:
    if store_url.startswith("sqlite"):
        pytest.skip("a MariaDB restart only concerns the MySQL backend")
    if not (shutil.which("mysqladmin") and shutil.which("start-stop-daemon") and _mariadb_running()):
        pytest.skip("needs a local MariaDB managed by start-stop-daemon")
    s = await make_store(retry_total=30.0)
    impatient = await make_store(retry_total=0.3)
    epoch = await owned(s)
    await s.upsert_job(spec("a"), 0, NOW)

    outcomes: dict[str, int] = {"ok": 0, "store_error": 0}
    raw_errors: list[BaseException] = []
    stop = asyncio.Event()

    async def hammer(st: Store, i: int) -> None:
        horizon = 0
        while not stop.is_set():
            try:
                if i % 2:
                    await st.get_app("app")
                else:
                    horizon += 10
                    await st.claim_due("s1", "app", epoch, horizon, every(10), NOW)
                outcomes["ok"] += 1
            except StoreError:
                outcomes["store_error"] += 1
            except Exception as exc:  # a raw driver exception is the failure we look for
                raw_errors.append(exc)
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(hammer(s, 0)), asyncio.create_task(hammer(s, 1)),
             asyncio.create_task(hammer(impatient, 1))]
    try:
        await asyncio.sleep(0.2)
        before = outcomes["ok"]
        await asyncio.to_thread(_restart_mariadb, store_url)
        await asyncio.sleep(0.5)
    finally:
        if not _mariadb_answers(store_url):
            await asyncio.to_thread(_start_mariadb, store_url)
        await asyncio.to_thread(_revive_sync_connections)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 40)
    assert raw_errors == []
    assert outcomes["ok"] > before
    # the patient store rode the outage out; both work again afterwards
    assert (await s.get_app("app")).epoch == epoch
    assert (await impatient.get_app("app")).owner == "s1"
    rows = await s.claim_due("s1", "app", epoch, 10_000_000, every(1_000_000), NOW)
    unfinished = await s.load_unfinished("app")
    assert len({(r.job_id, r.planned_ms) for r in unfinished}) == len(unfinished) >= len(rows)
