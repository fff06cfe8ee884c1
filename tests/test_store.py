"""One contract suite for every store backend (SQLite file, MySQL/MariaDB, in-process memory).

The ``store`` fixture is parametrized over the backends; the MySQL third uses ``mysql_dsn``
from conftest (skips without FASTJOB_TEST_MYSQL_DSN unless FASTJOB_REQUIRE_MYSQL=1). The memory
third uses a ``memory://NAME`` of its own per test, so that the stores ``make_store`` opens share
one database as the SQL stores of a test do. Peeks at the SQL underneath (``raw``) are for the
SQL stores only, and a test that is about SQL itself (migrations of old schemas, a dropped
table, replies lost on the connection) skips on memory, saying why.
"""
from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from harness import wait_until
from private_mariadb import PrivateMariaDB

from fastjob.models import (
    RUN_HISTORY,
    InstanceUpdate,
    JobRow,
    JobRun,
    JobSpec,
    LogLine,
    PausedBy,
    ScheduleType,
    Status,
    TaskBatch,
    root_of,
    task_key,
)
from fastjob.schedule import make_planner
from fastjob.store import FirePlan, FirePlanner, NotOwnerError, Store, StoreError, create_store
from fastjob.store.codecs import FIRST_ATTEMPT
from fastjob.store.memory import drop_database
from fastjob.store.schema import LATEST_VERSION
from fastjob.store.sql import SQLStore

BACKENDS = ["sqlite", "mysql", "memory"]
#: For the tests that inspect SQL itself (the memory store has none of it): not run on memory at all.
sql_only = pytest.mark.parametrize("store_url", ["sqlite", "mysql"], indirect=True)
NOW = 1_700_000_000.0


def every(ms: int) -> FirePlanner:
    """A fixed-rate planner with no misfires (nothing is ever late)."""
    return make_planner(-(2 ** 62), 0, lambda job, t: t + ms)


no_more: FirePlanner = make_planner(-(2 ** 62), 0, lambda job, t: None)


def spec(name: str = "j1", app: str = "app", **kw) -> JobSpec:
    kw.setdefault("schedule_type", ScheduleType.FIXED_RATE)
    kw.setdefault("schedule_expr", "1")
    return JobSpec(app=app, name=name, handler=kw.pop("handler", "mod:func"), **kw)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/fastjob.db"
    elif request.param == "memory":
        name = f"test-store-{uuid.uuid4().hex}"
        yield f"memory://{name}"
        drop_database(name)
    else:
        yield request.getfixturevalue("mysql_dsn")


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


def on_sql(store: Store) -> bool:
    """There is SQL under the store for ``raw`` to peek at (every backend but memory)."""
    return isinstance(store, SQLStore)


async def raw(store: Store, sql: str, params=()) -> list[tuple]:
    """Read-only peek under a SQL store (test helper)."""
    return await store._run("raw", lambda: store._op_query(sql, params), tx=False)  # type: ignore[attr-defined]


async def owned(store: Store, app: str = "app", server: str = "s1") -> int:
    row = await store.ensure_app(app)
    epoch = await store.claim_app(app, server, row.epoch)
    assert epoch is not None
    return epoch


# ---- lifecycle & migrations ------------------------------------------------------------
async def test_open_is_idempotent(store: Store, make_store) -> None:
    if on_sql(store):
        assert (await raw(store, "SELECT version FROM schema_version"))[0][0] == LATEST_VERSION
    again = await make_store()  # a second open of a migrated database is a no-op
    await again.open()
    if on_sql(again):
        assert (await raw(again, "SELECT COUNT(*) FROM schema_version"))[0][0] == 1
    await store.close()
    await store.close()  # safe twice


async def test_concurrent_migrations(make_store) -> None:
    stores = [await make_store(open_=False) for _ in range(5)]
    await asyncio.gather(*(s.open() for s in stores))
    for s in stores:
        if on_sql(s):  # memory: no schema; the stores opened at once still share one database
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

    handler = await store.upsert_job(spec("b", handler="m:g", params={"k": [1, 2]}, tags=["gpu"], timeout=2.5),
                                     9999, NOW + 2)
    assert (handler.version, handler.next_trigger_ms, handler.handler) == (2, 1000, "m:g")  # not a schedule change

    sched = await store.upsert_job(spec("b", schedule_expr="5", handler="m:g"), 7000, NOW + 3)
    assert (sched.version, sched.next_trigger_ms, sched.schedule_expr, sched.id) == (3, 7000, "5", j.id)
    if on_sql(store):
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
    if on_sql(store):
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
    back = await store.upsert_job(spec("c", schedule_type=ScheduleType.CRON, schedule_expr="*/5 * * * *"),
                                  900, NOW + 13)
    assert (back.enabled, back.next_trigger_ms) == (True, 900)


# ---- declared jobs (store/job_writes.py's rules, the same on every backend) ---------------------
def first_at(ms: int) -> Callable[[JobSpec], int | None]:
    return lambda _spec: ms


async def test_declared_jobs_are_code_owned_and_an_unchanged_declaration_writes_nothing(store: Store) -> None:
    rows = await store.declare_jobs("app", [spec("a"), spec("b", enabled=False)], first_at(1000), NOW)
    by_name = {row.name: row for row in rows}
    assert (by_name["a"].origin, by_name["a"].paused_by, by_name["a"].next_trigger_ms) == ("code", None, 1000)
    assert (by_name["b"].enabled, by_name["b"].paused_by) == (False, "code")
    assert await store.declare_jobs("app", [spec("a"), spec("b", enabled=False)], first_at(5000), NOW + 1) == []
    assert (await store.get_job_by_name("app", "a")).version == 1


async def test_a_declaration_never_resumes_an_operators_pause_but_resumes_its_own(store: Store) -> None:
    await store.declare_jobs("app", [spec("op"), spec("code", enabled=False)], first_at(1000), NOW)
    assert await store.set_job_enabled("app", "op", False, None, NOW + 1)
    assert (await store.get_job_by_name("app", "op")).paused_by == "operator"
    written = await store.declare_jobs("app", [spec("op"), spec("code")], first_at(7000), NOW + 2)
    assert [row.name for row in written] == ["code"]
    resumed = written[0]
    assert (resumed.enabled, resumed.paused_by, resumed.next_trigger_ms) == (True, None, 7000)
    still = await store.get_job_by_name("app", "op")
    assert (still.enabled, still.paused_by) == (False, "operator")
    assert await store.set_job_enabled("app", "op", True, 8000, NOW + 3)  # the operator resumes it
    assert (await store.get_job_by_name("app", "op")).paused_by is None


async def test_a_job_paused_as_undeclared_resumes_when_declared_again(store: Store) -> None:
    await store.declare_jobs("app", [spec("a"), spec("b")], first_at(1000), NOW)
    paused = await store.pause_jobs("app", ["a", "missing"], PausedBy.UNDECLARED, NOW + 1)
    assert [(row.name, row.enabled, row.paused_by) for row in paused] == [("a", False, "undeclared")]
    assert await store.pause_jobs("app", ["a"], PausedBy.UNDECLARED, NOW + 2) == []  # already paused
    [back] = await store.declare_jobs("app", [spec("a"), spec("b")], first_at(9000), NOW + 3)
    assert (back.name, back.enabled, back.paused_by, back.next_trigger_ms) == ("a", True, None, 9000)


async def test_resume_jobs_resumes_only_what_was_paused_for_that_reason(store: Store) -> None:
    await store.declare_jobs("app", [spec("a"), spec("b"), spec("c")], first_at(1000), NOW)
    await store.pause_jobs("app", ["a", "b"], PausedBy.UNDECLARED, NOW + 1)
    await store.set_job_enabled("app", "b", False, None, NOW + 2)  # the operator pauses it too: theirs now
    resumed = await store.resume_jobs("app", ["a", "b", "c", "missing"], PausedBy.UNDECLARED, NOW + 3)
    assert [(r.name, r.enabled, r.paused_by, r.next_trigger_ms) for r in resumed] == [("a", True, None, 1000)]
    assert (await store.get_job_by_name("app", "b")).paused_by == "operator"


async def test_a_one_shot_that_fired_is_not_fired_again_by_a_redeclaration(store: Store) -> None:
    once = spec("once", schedule_type=ScheduleType.ONCE, schedule_expr="1700000000.0")
    run_once = spec("run_once", schedule_type=ScheduleType.ONCE, schedule_expr="", run_once=True)
    await store.declare_jobs("app", [once, run_once], first_at(1000), NOW)
    for name in ("once", "run_once"):  # as after its fire: enabled, no next fire
        await store.set_job_enabled("app", name, True, None, NOW + 1)
    await store.declare_jobs("app", [once, run_once], first_at(5000), NOW + 2)
    assert [(await store.get_job_by_name("app", n)).next_trigger_ms for n in ("once", "run_once")] == [None, None]
    # paused as undeclared and declared again: still nothing to fire
    await store.pause_jobs("app", ["once", "run_once"], PausedBy.UNDECLARED, NOW + 3)
    back = await store.declare_jobs("app", [once, run_once], first_at(6000), NOW + 4)
    assert [(row.enabled, row.next_trigger_ms) for row in back] == [(True, None), (True, None)]


async def test_api_jobs_stay_api_owned_until_code_declares_them(store: Store) -> None:
    api = await store.upsert_job(spec("j"), 1000, NOW)
    assert api.origin == "api"
    assert (await store.upsert_job(spec("j", handler="m:other"), 1000, NOW + 1)).origin == "api"
    [taken] = await store.declare_jobs("app", [spec("j", handler="m:other")], first_at(1000), NOW + 2)
    assert (taken.origin, taken.version) == ("code", 3)
    assert (await store.upsert_job(spec("j", handler="m:third"), 1000, NOW + 3)).origin == "code"


async def test_a_large_batch_is_declared_in_one_call(store: Store) -> None:
    specs = [spec(f"j{i:05d}") for i in range(2500)]
    assert len(await store.declare_jobs("app", specs, first_at(1000), NOW)) == 2500
    changed = [spec(f"j{i:05d}", timeout=5.0 if i % 1000 == 0 else None) for i in range(2500)]
    written = await store.declare_jobs("app", changed, first_at(2000), NOW + 1)
    assert sorted(row.name for row in written) == ["j00000", "j01000", "j02000"]
    assert all(row.next_trigger_ms == 1000 for row in written)  # not a schedule change
    assert len(await store.list_jobs("app")) == 2500


async def test_rows_returned_for_new_jobs_are_the_rows_stored(store: Store) -> None:
    declared = [spec("a", params={"n": 1, "deep": [1, {"x": None}]}, tags=["t1", "t2"], timeout=2.5),
                spec("b", schedule_type=ScheduleType.FIXED_RATE, schedule_expr="1.5", enabled=False)]
    rows = await store.declare_jobs("app", declared, first_at(1000), NOW)
    assert sorted(rows, key=lambda r: r.name) == [await store.get_job_by_name("app", n) for n in ("a", "b")]


async def test_the_anchor_moves_only_when_the_schedule_takes_effect_anew(store: Store) -> None:
    rate = spec("r", schedule_type=ScheduleType.FIXED_RATE, schedule_expr="1")
    [new] = await store.declare_jobs("app", [rate], first_at(1000), NOW)
    assert new.anchor_ms == int(NOW * 1000)
    [params_only] = await store.declare_jobs("app", [spec("r", schedule_type=ScheduleType.FIXED_RATE,
                                                          schedule_expr="1", params=7)], first_at(1000), NOW + 1)
    assert params_only.anchor_ms == int(NOW * 1000)  # its grid stays where it was
    [faster] = await store.declare_jobs("app", [spec("r", schedule_type=ScheduleType.FIXED_RATE,
                                                     schedule_expr="0.5", params=7)], first_at(1000), NOW + 2)
    assert faster.anchor_ms == int((NOW + 2) * 1000)
    await store.set_job_enabled("app", "r", False, None, NOW + 3)
    assert (await store.get_job_by_name("app", "r")).anchor_ms == int((NOW + 2) * 1000)
    await store.set_job_enabled("app", "r", True, None, NOW + 4)  # an operator's resume starts it anew
    assert (await store.get_job_by_name("app", "r")).anchor_ms == int((NOW + 4) * 1000)


@sql_only
async def test_a_row_without_a_digest_is_compared_by_its_definition(store: Store) -> None:
    await store.declare_jobs("app", [spec("a"), spec("b")], first_at(1000), NOW)
    await store._run("raw", lambda: store._op_exec("UPDATE jobs SET spec_digest = NULL"), tx=True)  # type: ignore
    assert await store.declare_jobs("app", [spec("a"), spec("b")], first_at(1000), NOW + 1) == []
    assert await raw(store, "SELECT COUNT(*) FROM jobs WHERE spec_digest IS NULL") == [(0,)]  # noted now
    await store._run("raw", lambda: store._op_exec("UPDATE jobs SET spec_digest = NULL"), tx=True)  # type: ignore
    [changed] = await store.declare_jobs("app", [spec("a", timeout=3.0), spec("b")], first_at(1000), NOW + 2)
    assert (changed.name, changed.timeout) == ("a", 3.0)
    # and a stored digest that does not match what was declared is not trusted either
    await store._run("raw", lambda: store._op_exec("UPDATE jobs SET spec_digest = 'x'"), tx=True)  # type: ignore
    assert await store.declare_jobs("app", [spec("a", timeout=3.0), spec("b")], first_at(1000), NOW + 3) == []


async def test_mode_and_min_success_are_stored_and_a_change_of_them_is_no_schedule_change(store: Store) -> None:
    [new] = await store.declare_jobs("app", [spec("b", mode="broadcast", min_success=0.5)], first_at(1000), NOW)
    assert (new.mode, new.min_success) == ("broadcast", 0.5)
    assert await store.get_job_by_name("app", "b") == new  # the row built from the INSERT is the row stored
    assert await store.declare_jobs("app", [spec("b", mode="broadcast", min_success=0.5)], first_at(5000),
                                    NOW + 1) == []
    [bar] = await store.declare_jobs("app", [spec("b", mode="broadcast", min_success=1)], first_at(5000), NOW + 2)
    assert (bar.min_success, bar.version, bar.next_trigger_ms) == (1.0, 2, 1000)  # its fire keeps its place
    single = await store.upsert_job(spec("b"), 5000, NOW + 3)
    assert (single.mode, single.min_success, single.version) == ("single", 1.0, 3)
    api = await store.upsert_job(spec("a", mode="broadcast", min_success=0.25), 1000, NOW)
    assert (await store.get_job(api.id)) == api and (api.mode, api.min_success) == ("broadcast", 0.25)


# ---- second-level run history ----------------------------------------------------------------
def run(job_id: int, n: int, status: str = "succeeded", **kw: Any) -> JobRun:
    return JobRun(job_id, "app", "w1", NOW + n, NOW + n + 0.01, 0.5, status, **kw)


async def test_job_runs_are_listed_newest_first_and_pruned_to_the_history(store: Store) -> None:
    await store.add_job_runs([run(1, 0, "failed", error="boom", logs=[[NOW, "ERROR", "boom"]]), run(2, 0)])
    await store.add_job_runs([run(1, n) for n in range(1, RUN_HISTORY + 5)], prune=[1])
    kept = await store.list_job_runs(1, limit=1000)
    assert len(kept) == RUN_HISTORY
    assert [r.planned_at for r in kept[:2]] == [NOW + RUN_HISTORY + 4, NOW + RUN_HISTORY + 3]
    assert kept[0].id > kept[1].id > 0
    assert [(r.status, r.worker, r.logs) for r in await store.list_job_runs(2)] == [("succeeded", "w1", [])]
    assert await store.list_job_runs(1, limit=0) == []


async def test_a_job_run_keeps_its_error_and_log_lines(store: Store) -> None:
    await store.add_job_runs([run(7, 0, "timed_out", error="timed out after 1s",
                                  logs=[[NOW, "INFO", "start"], [NOW + 1, "WARNING", "slow"]])])
    [got] = await store.list_job_runs(7)
    assert (got.status, got.error, got.logs, got.duration) == (
        "timed_out", "timed out after 1s", [[NOW, "INFO", "start"], [NOW + 1, "WARNING", "slow"]], 0.5)


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
        assert (r.status, r.attempt, r.trigger, r.server, r.epoch, r.app) == (
            Status.WAITING, FIRST_ATTEMPT, "schedule", "s1", epoch, "app")
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


async def test_claim_due_reports_only_the_rows_it_wrote(store: Store) -> None:
    """A claim some of whose fires are already recorded returns the new rows only: never an older
    row of the app (here one recorded skipped), which the scheduler would fire as if it waited."""
    epoch = await owned(store)
    job = await store.upsert_job(spec("j"), 0, NOW)
    first = await store.claim_due("s1", "app", epoch, 10, lambda j, h, b: FirePlan(runs=[3], skipped=[(2, "x")]),
                                  NOW)
    assert [r.planned_ms for r in first] == [3]
    await store.set_next_trigger("s1", "app", epoch, job.id, 0)
    again = await store.claim_due("s1", "app", epoch, 10, lambda j, h, b: FirePlan(runs=[1, 3]), NOW + 1)
    assert [(r.planned_ms, r.status) for r in again] == [(1, Status.WAITING)]
    stored = {r.planned_ms: r.status for r in await store.list_instances("app")}
    assert stored == {1: Status.WAITING, 2: Status.SKIPPED, 3: Status.WAITING}


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
    assert row is not None
    assert (row.status, row.trigger, row.params, row.attempt) == (Status.WAITING, "api", {"x": "y"}, 1)
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
    done = InstanceUpdate(r1.id, Status.SUCCEEDED, finished_at=NOW + 4, result={"ok": True})
    assert await store.update_instances([done]) == 1
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
    assert (got4.status, got4.worker, got4.dispatched_at, got4.started_at, got4.finished_at, got4.error,
            got4.result) == (
        Status.TIMED_OUT, "w4", NOW + 5, NOW + 6, NOW + 7, "timeout", None)
    assert await store.update_instances([]) == 0
    assert j.id == r1.job_id


async def test_write_statuses_is_one_batch_of_updates_logs_and_finish_times(store: Store) -> None:
    """The status writer's flush: instance updates, log lines and each job's latest finish in one
    call; a finish time never moves back (an older one in a later batch leaves it)."""
    epoch = await owned(store)
    a = await store.upsert_job(spec("a"), None, NOW)
    b = await store.upsert_job(spec("b"), None, NOW)
    r1 = await store.insert_instance("s1", "app", epoch, a.id, 1000, 1, "api", None, NOW)
    r2 = await store.insert_instance("s1", "app", epoch, b.id, 1000, 1, "api", None, NOW)
    await store.write_statuses(
        [InstanceUpdate(r1.id, Status.DISPATCHED, worker="w"), InstanceUpdate(r1.id, Status.SUCCEEDED,
                                                                              finished_at=NOW + 2, result=[1]),
         InstanceUpdate(r2.id, Status.RUNNING, started_at=NOW + 1)],
        [LogLine(r1.id, NOW + 1, "INFO", "one"), LogLine(r1.id, NOW + 1.5, "INFO", "two")],
        {a.id: NOW + 2, b.id: NOW + 5})
    got1, got2 = await store.get_instance(r1.id), await store.get_instance(r2.id)
    assert (got1.status, got1.worker, got1.result, got1.finished_at) == (Status.SUCCEEDED, "w", [1], NOW + 2)
    assert (got2.status, got2.started_at) == (Status.RUNNING, NOW + 1)
    assert [ln.message for ln in await store.get_logs(r1.id)] == ["one", "two"]
    await store.write_statuses([], [], {a.id: NOW + 1, b.id: NOW + 9})  # a's is older: kept
    assert (await store.get_job(a.id)).last_finished_time == NOW + 2
    assert (await store.get_job(b.id)).last_finished_time == NOW + 9
    await store.write_statuses([], [], {})  # nothing to do is fine


async def test_update_instances_big_batch(store: Store) -> None:
    epoch = await owned(store)
    await store.upsert_job(spec("a"), 0, NOW)
    rows = await store.claim_due("s1", "app", epoch, 2499, every(1), NOW, limit=5000)
    assert len(rows) == 2500
    n = await store.update_instances(InstanceUpdate(r.id, Status.SUCCEEDED, finished_at=NOW, result={"i": r.id})
                                     for r in rows)
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
    await store.append_logs([LogLine(7, NOW + i, "INFO" if i % 2 else "ERROR", f"line {i} ünïcødé ✓")
                             for i in range(1500)])
    await store.append_logs([LogLine(8, NOW, "INFO", "other")])
    await store.append_logs([])
    lines = await store.get_logs(7, limit=2000)
    assert len(lines) == 1500 and lines[0].message == "line 0 ünïcødé ✓" and lines[-1].ts == NOW + 1499
    assert [ln.message for ln in await store.get_logs(7, limit=2)] == ["line 0 ünïcødé ✓", "line 1 ünïcødé ✓"]
    assert await store.get_logs(9) == []


# ---- errors and resilience ------------------------------------------------------------------
@sql_only  # it drops a table under the store; memory's one error, a store not open, is tested below
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


async def test_sqlite_locked_database_is_retried(tmp_path, caplog) -> None:
    """SQLite only (lock contention is its own): a locked database is retried until it is free,
    and past the bound the caller gets StoreError, never sqlite3.OperationalError."""
    from fastjob.store.sqlite import SQLiteStore

    path = tmp_path / "locked.db"
    s = SQLiteStore(str(path), busy_timeout=0.05, retry_total=5.0)
    await s.open()
    blocker = sqlite3.connect(str(path), isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with caplog.at_level("WARNING", logger="fastjob.store"):
            task = asyncio.create_task(s.ensure_app("x"))
            await wait_until(lambda: sum("transient error" in r.getMessage() for r in caplog.records) >= 2, 5,
                             "two retries of the locked write")
        assert not task.done(), "the write went through a lock held by another connection"
        blocker.execute("COMMIT")
        assert (await asyncio.wait_for(task, 5)).name == "x"
        s.retry_total = 0.3
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="unavailable"):
            await s.ensure_app("y")
        blocker.execute("ROLLBACK")
        assert (await s.ensure_app("y")).name == "y"
    finally:
        blocker.close()
        await s.close()


async def test_inserted_id_strategies(store: Store) -> None:
    """RETURNING, first-id + consecutive ids, and first-id + read back give the same answers,
    with the fires sent as a VALUES list or (MySQL) as one JSON_TABLE parameter: every strategy
    the backend can use, each on an app of its own. The memory store has no strategies, only the
    answers they must agree on."""
    if not on_sql(store):
        await _ids_agree(store, "app0")
        return
    d = store.dialect  # type: ignore[attr-defined]
    if d.name == "mysql":  # the probe must find this machine's MariaDB's fast paths, not fall back
        assert store.json_rows and store.json_table  # type: ignore[attr-defined]
        strategies = [(False, False, False), (False, True, False), (False, False, True), (False, True, True)]
    else:  # SQLite has RETURNING and no JSON_TABLE
        strategies = [(True, False, False), (False, False, False), (False, True, False)]
    for n, (returning, consecutive, json_table) in enumerate(strategies):
        store.dialect = type(d)(returning=returning)  # type: ignore[attr-defined]
        store.consecutive_ids = consecutive  # type: ignore[attr-defined]
        store.json_table = json_table  # type: ignore[attr-defined]
        await _ids_agree(store, f"app{n}")


async def _ids_agree(store: Store, app: str) -> None:
    epoch = await owned(store, app=app)
    a = await store.upsert_job(spec("a", app=app), 1000, NOW)
    pre = await store.insert_instance("s1", app, epoch, a.id, 2000, 1, "schedule", {"x": 1}, NOW)
    assert pre is not None and pre.params == {"x": 1} and pre.planned_ms == 2000
    assert await store.insert_instance("s1", app, epoch, a.id, 2000, 1, "schedule", None, NOW + 1) is None
    # the same write again (a retry of an unanswered try, same stamp): the row it committed
    assert await store.insert_instance("s1", app, epoch, a.id, 2000, 1, "schedule", {"x": 1}, NOW) == pre
    rows = await store.claim_due("s1", app, epoch, 4000, every(1000), NOW)
    assert sorted(r.planned_ms for r in rows) == [1000, 3000, 4000]  # 2000 was a duplicate
    assert {r.id for r in rows}.isdisjoint({pre.id})
    for r in rows:
        assert await store.get_instance(r.id) == r
    b = await store.upsert_job(spec("b", app=app, params=[1]), 0, NOW)
    rows = await store.claim_due("s1", app, epoch, 2999, every(1), NOW, limit=3000)  # 3 chunks, no dups
    assert len(rows) == 3000 and {r.job_id for r in rows} == {b.id}
    for r in rows[::997] + rows[-1:]:
        assert await store.get_instance(r.id) == r
    row = await store.insert_instance("s1", app, epoch, b.id, 99_999, 2, "retry", {"z": None}, NOW, reruns=1)
    assert row is not None and row.reruns == 1 and await store.get_instance(row.id) == row


# ---- version 2: misfire plans, ownership history, the worker registry, lost replies --------------
async def test_claim_due_writes_catch_up_and_skipped_fires(store: Store) -> None:
    """A plan's runs and catch-ups become waiting rows (returned); its skipped fires become final
    rows carrying their reason (not returned: nothing is left to do with them)."""
    epoch = await owned(store)
    j = await store.upsert_job(spec("j"), 1000, NOW)

    def plan(job: JobRow, horizon_ms: int, budget: int) -> FirePlan:
        assert (job.id, job.misfire_policy, job.catch_up_window) == (j.id, "fire_once", 3600.0)
        return FirePlan(runs=[5000], catch_up=[3000], skipped=[(1000, "misfire: a"), (2000, "misfire: b")],
                        next_ms=6000)

    rows = await store.claim_due("s1", "app", epoch, 5000, plan, NOW)
    assert sorted((r.planned_ms, r.trigger, r.status) for r in rows) == [
        (3000, "catch_up", Status.WAITING), (5000, "schedule", Status.WAITING)]
    skipped = await store.list_instances("app", j.id, [Status.SKIPPED])
    assert sorted((r.planned_ms, r.error, r.finished_at, r.attempt) for r in skipped) == [
        (1000, "misfire: a", NOW, 1), (2000, "misfire: b", NOW, 1)]
    assert (await store.get_job(j.id)).next_trigger_ms == 6000
    assert {r.id for r in await store.load_unfinished("app")} == {r.id for r in rows}


async def test_ownership_history_is_recorded(store: Store) -> None:
    await store.ensure_app("a")
    assert await store.claim_app("a", "s1", 0) == 1
    row = await store.get_app("a")
    assert (row.owner, row.prev_owner, row.left_clean, row.adopted) == ("s1", None, False, True)
    # a hand-over: s1 wrote everything and gives it to s2, which has not loaded it yet
    assert await store.claim_app("a", "s2", 1, prev_owner="s1", left_clean=True, adopted=False) == 2
    row = await store.get_app("a")
    assert (row.owner, row.epoch, row.prev_owner, row.left_clean, row.adopted) == ("s2", 2, "s1", True, False)
    assert await store.claim_app("a", "s2", 2, prev_owner="s1", left_clean=True) == 3  # s2 adopts it
    assert (await store.get_app("a")).adopted
    await store.ensure_app("b")
    assert await store.claim_app("b", "s2", 0) == 1
    assert await store.release_apps("s2", ["nope"]) == []
    assert await store.release_apps("s2", ["a"]) == ["a"]  # only the app named
    apps = {a.name: a for a in await store.list_apps()}
    assert (apps["a"].owner, apps["a"].epoch, apps["a"].prev_owner, apps["a"].left_clean,
            apps["a"].adopted) == (None, 4, "s2", True, False)
    assert (apps["b"].owner, apps["b"].epoch) == ("s2", 1)


async def test_worker_registry(store: Store) -> None:
    await store.register_worker("app", "w1", "s1", NOW, {"tags": ["x"]})
    await store.register_worker("app", "w2", "s1", NOW, None)
    await store.register_worker("other", "w1", "s9", NOW, None)
    await store.register_worker("app", "w1", "s2", NOW + 1, {"tags": []})  # it moved to s2
    assert [(w.worker_id, w.server, w.connected_at, w.info) for w in await store.list_workers("app")] == [
        ("w1", "s2", NOW + 1, {"tags": []}), ("w2", "s1", NOW, None)]
    assert [w.worker_id for w in await store.list_workers("app", "s1")] == ["w2"]
    await store.unregister_worker("app", "w1", "s1")  # s1 no longer has it: kept
    assert len(await store.list_workers("app")) == 2
    await store.unregister_worker("app", "w1", "s2")
    assert [w.worker_id for w in await store.list_workers("app")] == ["w2"]
    assert [(w.worker_id, w.server) for w in await store.list_workers("other")] == [("w1", "s9")]


async def test_server_load_and_drain(store: Store) -> None:
    await store.register_server("s1", "h:1", NOW)
    assert await store.heartbeat_server("s1", NOW + 1, 2.5)
    assert await store.set_server_drain("s1", True)
    assert not await store.set_server_drain("ghost", True)
    (row,) = await store.list_servers()
    assert (row.heartbeat_at, row.load_score, row.drain) == (NOW + 1, 2.5, True)
    assert await store.set_server_drain("s1", False)
    assert not (await store.list_servers())[0].drain


async def test_queued_is_between_waiting_and_dispatched(store: Store) -> None:
    epoch = await owned(store)
    j = await store.upsert_job(spec("j"), None, NOW)
    r1 = await store.insert_instance("s1", "app", epoch, j.id, 1000, 1, "schedule", None, NOW)
    r2 = await store.insert_instance("s1", "app", epoch, j.id, 2000, 1, "schedule", None, NOW)
    await store.update_instances([InstanceUpdate(r1.id, Status.QUEUED), InstanceUpdate(r2.id, Status.QUEUED)])
    await store.update_instances([InstanceUpdate(r1.id, Status.DISPATCHED, worker="w")])
    await store.update_instances([InstanceUpdate(r1.id, Status.QUEUED)])  # late: never backwards
    await store.update_instances([InstanceUpdate(r2.id, Status.WAITING)])
    assert (await store.get_instance(r1.id)).status is Status.DISPATCHED
    assert (await store.get_instance(r2.id)).status is Status.QUEUED
    assert {r.id for r in await store.load_unfinished("app")} == {r1.id, r2.id}


@sql_only  # memory: nothing outlives the process, so no database of an older schema exists
async def test_migration_from_version_1_converts_rows(store_url: str) -> None:
    """A version-1 database: allow_overlap becomes overlap (true -> allow, false -> queue, never
    skip), misfired and 'cancelled: skipped' instances become skipped, and nothing else changes."""
    from fastjob.store.schema import MIGRATIONS, SCHEMA_VERSION_DDL
    dialect = "sqlite" if store_url.startswith("sqlite") else "mysql"
    statements = [SCHEMA_VERSION_DDL[dialect], "INSERT INTO schema_version (id, version) VALUES (1, 1)",
                  *MIGRATIONS[dialect][0],
                  "INSERT INTO jobs (app, name, handler, schedule_type, tags, allow_overlap, created_time,"
                  " updated_time) VALUES ('app', 'par', 'h', 'api', '[]', 1, 0, 0), ('app', 'ser', 'h', 'api', '[]',"
                  " 0, 0, 1700000000.25)",
                  "INSERT INTO instances (job_id, app, planned_ms, attempt, status, trigger_kind, epoch, created_at,"
                  " error) VALUES (1, 'app', 1, 1, 'misfired', 'schedule', 1, 0, 'late'),"
                  " (1, 'app', 2, 1, 'cancelled', 'schedule', 1, 0, 'skipped: an earlier instance still runs'),"
                  " (1, 'app', 3, 1, 'cancelled', 'schedule', 1, 0, 'job deleted'),"
                  " (1, 'app', 4, 1, 'succeeded', 'schedule', 1, 0, NULL)"]
    _raw_exec(store_url, statements)
    s = create_store(store_url)
    await s.open()
    try:
        jobs = {j.name: j for j in await s.list_jobs("app")}
        assert (jobs["par"].overlap, jobs["ser"].overlap) == ("allow", "queue")
        assert (jobs["par"].max_queued, jobs["par"].catch_up_window) == (100, 3600.0)
        assert (jobs["ser"].anchor_ms, jobs["ser"].origin, jobs["ser"].paused_by) == (1700000000250, "api", None)
        rows = sorted(await s.list_instances("app", limit=10), key=lambda r: r.planned_ms)
        assert [(r.status.value, r.reruns) for r in rows] == [
            ("skipped", 0), ("skipped", 0), ("cancelled", 0), ("succeeded", 0)]
        assert (await raw(s, "SELECT version FROM schema_version"))[0][0] == LATEST_VERSION
        app = await s.ensure_app("app")
        assert (app.prev_owner, app.left_clean, app.adopted) == (None, False, True)
    finally:
        await s.close()


#: The digests a version-6 server stored for spec("plain") and spec("alarmed", alarm=ALARMED) (any
#: name: the name is not digested), pinned: an upgrade must not change them.
V6_DIGESTS = {"plain": "770a3674dc50eb4860204e3c", "alarmed": "9724e11ca314d34b3a2fd7ea"}
ALARMED = {"on": ["failed"]}


@sql_only  # memory: nothing outlives the process, so no database of an older schema exists
async def test_migration_from_version_6_keeps_every_jobs_digest(store_url: str) -> None:
    """Version 7 adds mode and min_success: a job of before them runs single, needs every run, and
    keeps the digest it was stored with, so that re-declaring it writes nothing (not even its digest)."""
    from fastjob.store.schema import MIGRATIONS, SCHEMA_VERSION_DDL
    dialect = "sqlite" if store_url.startswith("sqlite") else "mysql"
    columns = ("INSERT INTO jobs (app, name, handler, schedule_type, schedule_expr, `interval`, tags, alarm,"
               " origin, spec_digest, created_time, updated_time, anchor_ms) VALUES ")
    row = "('app', '{}', 'mod:func', 'fixed_rate', '1', '1', '[]', {}, 'code', {}, 0, 0, 0)"
    alarm = "'{\"on\":[\"failed\"]}'"
    _raw_exec(store_url, [
        SCHEMA_VERSION_DDL[dialect], "INSERT INTO schema_version (id, version) VALUES (1, 6)",
        *(sql for step in MIGRATIONS[dialect][:6] for sql in step),
        columns + ", ".join([row.format("plain", "NULL", f"'{V6_DIGESTS['plain']}'"),
                             row.format("alarmed", alarm, f"'{V6_DIGESTS['alarmed']}'"),
                             row.format("undigested", "NULL", "NULL")])])
    s = create_store(store_url)
    await s.open()
    try:
        assert (await raw(s, "SELECT version FROM schema_version"))[0][0] == LATEST_VERSION
        jobs = {j.name: j for j in await s.list_jobs("app")}
        assert {(j.mode, j.min_success, j.version) for j in jobs.values()} == {("single", 1.0, 1)}
        assert jobs["alarmed"].alarm == ALARMED
        declared = [spec("plain"), spec("alarmed", alarm=ALARMED), spec("undigested")]
        assert await s.declare_jobs("app", declared, first_at(1000), NOW) == []
        digests = dict(await raw(s, "SELECT name, spec_digest FROM jobs"))
        assert digests == {**V6_DIGESTS, "undigested": V6_DIGESTS["plain"]}  # compared by its definition, noted
        [broadcast] = await s.declare_jobs("app", [spec("plain", mode="broadcast", min_success=0.5)],
                                           first_at(1000), NOW + 1)
        assert (broadcast.mode, broadcast.min_success, broadcast.version) == ("broadcast", 0.5, 2)
        assert (await raw(s, "SELECT COUNT(*) FROM task_batches")) == [(0,)]
    finally:
        await s.close()


def _raw_exec(url: str, statements: list[str]) -> None:
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url[len("sqlite:///"):])
        try:
            for sql in statements:
                conn.execute(sql)
            conn.commit()
        finally:
            conn.close()
        return
    from conftest import _admin_connect

    conn = _admin_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"USE `{url.rsplit('/', 1)[1]}`")
            for sql in statements:
                cur.execute(sql)
    finally:
        conn.close()


@sql_only  # memory: no connection, so no reply to lose and nothing to retry
async def test_a_lost_reply_is_recognised_as_our_own_write(store: Store, store_url: str) -> None:
    """The database commits but the reply is lost (the connection drops right after COMMIT): the
    retry must recognise the rows its first attempt wrote, not report nothing done."""
    drive = store._drive  # type: ignore[attr-defined]
    lost = {"left": 0}
    if store_url.startswith("sqlite"):
        def after_commit(*args: object) -> object:
            value = drive(*args)
            if lost["left"]:
                lost["left"] -= 1
                raise sqlite3.OperationalError("database is locked")  # transient: retried
            return value
    else:
        import pymysql

        async def after_commit(*args: object) -> object:  # type: ignore[misc]
            value = await drive(*args)
            if lost["left"]:
                lost["left"] -= 1
                raise pymysql.err.OperationalError(2013, "Lost connection to server during query")
            return value
    store._drive = after_commit  # type: ignore[attr-defined]
    epoch = await owned(store)
    j = await store.upsert_job(spec("j"), 1000, NOW)
    lost["left"] = 1
    rows = await store.claim_due("s1", "app", epoch, 3000, every(1000), NOW)
    assert sorted(r.planned_ms for r in rows) == [1000, 2000, 3000]
    lost["left"] = 1
    again = await store.insert_instance("s1", "app", epoch, j.id, 1000, 2, "retry", None, NOW)
    assert again is not None and again.attempt == 2
    await store.ensure_app("b")
    lost["left"] = 1
    assert await store.claim_app("b", "s1", 0) == 1
    assert lost["left"] == 0


# ---- a real MariaDB restart (mysql only) ------------------------------------------------------
# These tests stop and start a private MariaDB of their own (tests/private_mariadb.py), never the
# shared server of FASTJOB_TEST_MYSQL_DSN that concurrent test runs use.

OUTAGE_S = 1.0  # the server stays down this long: longer than the impatient store's retry budget


@pytest.mark.mysql
async def test_mariadb_restart_mid_operations(private_mariadb: PrivateMariaDB) -> None:
    from fastjob.store.mysql import MySQLStore

    s = MySQLStore.from_url(private_mariadb.dsn + "?retry_total=30")
    impatient = MySQLStore.from_url(private_mariadb.dsn + "?retry_total=0.3")
    try:
        await s.open()
        await impatient.open()
        epoch = await owned(s)
        await s.upsert_job(spec("a"), 0, NOW)

        # per store: (started, finished) of every success, and how many StoreErrors
        ok: dict[str, list[tuple[float, float]]] = {"s": [], "impatient": []}
        store_errors: dict[str, int] = {"s": 0, "impatient": 0}
        raw_errors: list[BaseException] = []
        stop = asyncio.Event()

        async def hammer(st: Store, name: str, i: int) -> None:
            horizon = 0
            while not stop.is_set():
                began = time.monotonic()
                try:
                    if i % 2:
                        await st.get_app("app")
                    else:
                        horizon += 10
                        await st.claim_due("s1", "app", epoch, horizon, every(10), NOW)
                    ok[name].append((began, time.monotonic()))
                except StoreError:
                    store_errors[name] += 1
                except Exception as exc:  # a raw driver exception is the failure we look for
                    raw_errors.append(exc)
                await asyncio.sleep(0.01)

        marks: dict[str, float] = {}

        def outage() -> None:
            private_mariadb.stop()  # clean shutdown; returns once the process is gone
            marks["gone"] = time.monotonic()
            time.sleep(OUTAGE_S)
            marks["starting"] = time.monotonic()
            private_mariadb.start()  # same port and data; returns once it answers
            marks["up"] = time.monotonic()

        tasks = [asyncio.create_task(hammer(s, "s", 0)), asyncio.create_task(hammer(s, "s", 1)),
                 asyncio.create_task(hammer(impatient, "impatient", 1))]
        try:
            await asyncio.sleep(0.2)
            assert len(ok["s"]) > 0 and len(ok["impatient"]) > 0, "no traffic before the outage"
            await asyncio.to_thread(outage)
            # both work again afterwards: a call of each that began after the restart succeeds
            await wait_until(lambda: any(began >= marks["up"] for began, _ in ok["s"])
                             and any(began >= marks["up"] for began, _ in ok["impatient"]), 30,
                             "calls begun after the restart to succeed on both stores")
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 40)

        assert raw_errors == []
        # the impatient store gave up during the outage, with StoreError (checked above: nothing raw)
        assert store_errors["impatient"] > 0
        # the patient store rode the outage out: no errors, and calls in flight while there was no
        # server at all (between "gone" and "starting") succeeded
        assert store_errors["s"] == 0
        assert any(began < marks["starting"] and done > marks["gone"] for began, done in ok["s"])
        assert (await s.get_app("app")).epoch == epoch
        assert (await impatient.get_app("app")).owner == "s1"
        rows = await s.claim_due("s1", "app", epoch, 10_000_000, every(1_000_000), NOW)
        assert rows
        unfinished = await s.load_unfinished("app")
        assert len({(r.job_id, r.planned_ms) for r in unfinished}) == len(unfinished) >= len(rows)
    finally:
        await s.close()
        await impatient.close()


def test_private_mariadb_restarts(private_mariadb: PrivateMariaDB, tmp_path) -> None:
    """The private server is ours (not the shared one), keeps its data and port across a
    restart and a crash, and really goes away in between."""
    import pymysql

    db = private_mariadb
    port, dsn = db.port, db.dsn
    assert dsn == f"mysql://root@127.0.0.1:{port}/test"
    conn = db.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT @@port, @@datadir, @@bind_address, DATABASE()")
        assert cur.fetchone() == (port, f"{db.datadir}/", "127.0.0.1", "test")
        assert str(db.datadir).startswith(str(tmp_path))
        cur.execute("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(10)) ENGINE=InnoDB")
        cur.execute("INSERT INTO t VALUES (1, 'kept')")
    pid = db.process.pid

    db.restart()
    assert db.running and db.process.pid != pid and db.port == port and db.dsn == dsn
    with pytest.raises(pymysql.err.OperationalError), conn.cursor() as cur:  # died with the old server
        cur.execute("SELECT 1")
    conn.close()
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT v FROM t WHERE id = 1")
        assert cur.fetchone() == ("kept",)
        cur.execute("INSERT INTO t VALUES (2, 'crash')")

    db.kill()  # a crash: committed rows survive InnoDB recovery
    assert not db.running
    db.start()
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT id, v FROM t ORDER BY id")
        assert cur.fetchall() == ((1, "kept"), (2, "crash"))
    print(f"private MariaDB: start {db.last_start_seconds:.2f}s, stop {db.last_stop_seconds:.2f}s")


# ---- sub-task batches ------------------------------------------------------------------------------
def _batch(parent: str, call: int, start: int, items: list, **kw) -> TaskBatch:
    return TaskBatch(task_key(parent, call, start), "app", root_of(parent), parent, call, start, "h", items,
                     created_at=1000.0 + start, **kw)


async def test_task_batches_are_written_once_by_key_and_keep_their_results(store: Store) -> None:
    first = [_batch("7:100", 1, 0, [1, 2]), _batch("7:100", 1, 2, [3, {"x": [4]}])]
    assert await store.add_task_batches(first) == {}
    again = await store.add_task_batches([_batch("7:100", 1, 0, [9, 9]), _batch("7:100", 2, 0, [5])])
    assert list(again) == ["7:100|1|0"] and again["7:100|1|0"].items == [1, 2]  # stored, not overwritten
    done = again["7:100|1|0"]
    done.status, done.results, done.errors, done.worker = "failed", [2, None], [[1, "boom"]], "w1"
    done.logs, done.finished_at, done.attempt, done.parent_attempt = [[1.0, "INFO", "hi"]], 1005.0, 2, 3
    await store.save_task_batches([done])
    nested = _batch("7:100|1|0.1", 1, 0, [6])  # an item that mapped again
    await store.add_task_batches([nested])
    listed = await store.list_task_batches("7:100")
    assert [b.key for b in listed] == ["7:100|1|0", "7:100|1|2", "7:100|2|0", "7:100|1|0.1|1|0"]
    assert listed[0] == done
    assert listed[1].items == [3, {"x": [4]}] and listed[1].status == "waiting"
    assert [b.key for b in await store.list_task_batches("7:100", parent="7:100", call=1)] == ["7:100|1|0", "7:100|1|2"]
    assert [b.key for b in await store.list_task_batches("7:100", after_key="7:100|1|2", limit=1)] == ["7:100|2|0"]
    assert await store.list_task_batches("8:100") == []
    # items of the fire and of its nested maps; ended: the final batches' items; failed: their errors
    assert await store.task_progress(["7:100", "8:100"]) == {"7:100": (6, 2, 1)}
    assert await store.prune_older("task_batches", 1001.0, 100) == 3  # those written before 1001
    assert [b.key for b in await store.list_task_batches("7:100")] == ["7:100|1|2"]
