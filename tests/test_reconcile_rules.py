"""Rules of pausing code-declared jobs no live worker declares (server/reconcile.py), on the
in-memory store with hand-given times: no process, no sleep."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Collection

import pytest

from fastjob.models import JobRow, JobSpec, Origin, ScheduleType
from fastjob.server.reconcile import Reconciler
from fastjob.store import Store, create_store
from fastjob.store.codecs import ENABLED, spec_values
from fastjob.store.job_writes import StoredJob, plan_write

pytestmark = pytest.mark.rules
APP = "billing"
GRACE = 300.0
T0 = 1_700_000_000.0


def spec(name: str) -> JobSpec:
    return JobSpec(app=APP, name=name, handler="h", schedule_type=ScheduleType.FIXED_RATE, schedule_expr="60")


class Scene:
    """One owner's reconciler over a store; ``live`` is what the app's live workers declared."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.live: list[Collection[str]] | None = None
        self.owned = {APP}
        self.told: list[str] = []
        self.reconciler = Reconciler(store, GRACE, owned=lambda: self.owned, declarations=lambda app: self.live,
                                     changed=lambda job: self.told.append(job.name))

    async def check(self, at: float) -> list[str]:
        return [job.name for job in await self.reconciler.check(at)]

    async def job(self, name: str) -> JobRow:
        job = await self.store.get_job_by_name(APP, name)
        assert job is not None
        return job


@pytest.fixture
async def scene() -> AsyncIterator[Scene]:
    store = create_store(f"memory://reconcile-{uuid.uuid4().hex}")
    await store.open()
    await store.declare_jobs(APP, [spec("kept"), spec("removed")], lambda _: 0, T0)
    yield Scene(store)
    await store.close()


async def test_a_job_no_live_worker_declares_is_paused_after_the_grace_and_only_then(scene: Scene) -> None:
    scene.live = [{"kept"}]
    assert await scene.check(T0) == []
    assert await scene.check(T0 + GRACE - 1) == []
    assert await scene.check(T0 + GRACE) == ["removed"]
    removed = await scene.job("removed")
    assert (removed.enabled, removed.paused_by) == (False, "undeclared")
    assert (await scene.job("kept")).enabled
    assert scene.told == ["removed"]
    assert await scene.check(T0 + 2 * GRACE) == []  # paused once


async def test_the_union_of_the_live_workers_sets_counts(scene: Scene) -> None:
    scene.live = [{"kept"}, {"removed"}]  # a rolling deploy: old and new code side by side
    await scene.check(T0)
    assert await scene.check(T0 + 10 * GRACE) == []


async def test_nothing_is_judged_without_a_live_worker_or_while_one_still_declares(scene: Scene) -> None:
    for live in (None, []):
        scene.live = live
        await scene.check(T0)
        assert await scene.check(T0 + 10 * GRACE) == []


async def test_the_grace_starts_again_when_the_job_is_declared_in_between(scene: Scene) -> None:
    scene.live = [{"kept"}]
    await scene.check(T0)
    scene.live = [{"kept", "removed"}]
    await scene.check(T0 + GRACE / 2)
    scene.live = [{"kept"}]
    assert await scene.check(T0 + GRACE) == []  # undeclared again from here
    assert await scene.check(T0 + GRACE + GRACE / 2) == []
    assert await scene.check(T0 + 2 * GRACE) == ["removed"]


async def test_api_jobs_and_jobs_already_paused_are_never_touched(scene: Scene) -> None:
    await scene.store.upsert_job(spec("from_api"), 0, T0)
    await scene.store.set_job_enabled(APP, "removed", False, None, T0)  # an operator's pause
    scene.live = [{"kept"}]
    await scene.check(T0)
    assert await scene.check(T0 + 10 * GRACE) == []
    assert (await scene.job("removed")).paused_by == "operator"
    assert (await scene.job("from_api")).enabled


async def test_an_app_lost_and_regained_starts_its_grace_again(scene: Scene) -> None:
    scene.live = [{"kept"}]
    await scene.check(T0)
    scene.owned = set()
    await scene.check(T0 + GRACE / 2)
    scene.owned = {APP}
    assert await scene.check(T0 + GRACE) == []  # a new owner: a failover delays a pause, never hastens one
    assert await scene.check(T0 + 2 * GRACE) == ["removed"]


async def test_a_grace_of_zero_never_pauses(scene: Scene) -> None:
    scene.reconciler.grace = 0
    scene.live = [{"kept"}]
    assert await scene.check(T0) == [] and await scene.check(T0 + 1e9) == []


async def test_declaring_it_again_resumes_it(scene: Scene) -> None:
    scene.live = [{"kept"}]
    await scene.check(T0)
    await scene.check(T0 + GRACE)
    [back] = await scene.store.declare_jobs(APP, [spec("kept"), spec("removed")], lambda _: 42, T0 + GRACE + 1)
    assert (back.name, back.enabled, back.paused_by, back.next_trigger_ms) == ("removed", True, None, 42)


async def test_a_job_declared_while_its_pause_was_written_is_resumed(scene: Scene) -> None:
    answers = iter([[{"kept"}], [{"kept"}], [{"kept"}], [{"kept", "removed"}]])
    scene.reconciler._declarations = lambda app: next(answers)  # the last: read after the pause
    scene.live = [{"kept"}]
    assert await scene.check(T0) == []
    assert await scene.check(T0 + GRACE) == ["removed"]
    back = await scene.job("removed")
    assert (back.enabled, back.paused_by, back.next_trigger_ms) == (True, None, 0), "resumed, its fire kept"
    assert scene.told == ["removed", "removed"]


def test_an_operators_resume_through_the_api_plans_a_one_shot_anew_but_code_does_not() -> None:
    declared = spec_values(JobSpec(app="a", name="once", handler="h", schedule_type=ScheduleType.ONCE,
                                   schedule_expr="1700000000.0"))
    paused = declared[:ENABLED] + (0,) + declared[ENABLED + 1:]
    by_operator = StoredJob(1, 3, False, "api", "operator", paused)
    api = plan_write(by_operator, declared, Origin.API)
    assert api is not None and api.new_next, "JOB_UPSERT enabled=true resumes it with a fire, as JOB_ENABLE does"
    by_code = StoredJob(1, 3, False, "code", "code", paused)
    code = plan_write(by_code, declared, Origin.CODE)
    assert code is not None and not code.new_next, "code re-enabling a one-shot keeps its stored fire (or none)"
