"""Second-level rules in one process: who runs a handed-down job, and never two workers at once.

A worker runs its handed-down jobs only while it hears from its server within its lease; so
the server hands a job to another worker only once the first one's lease has surely run out
(its last frame + lease + margin), and after gaining an app it waits one lease for the old
runners to report before it assigns anything new. Fake time, a memory store, fake workers.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fakes import APP, FakeSession

from fastjob.models import JobSpec, ScheduleType
from fastjob.second_level_runner import first_planned, grid_origin, next_on_grid
from fastjob.server.second_level import SecondLevel
from fastjob.store import Store, create_store
from fastjob.tasks import BackgroundTasks
from fastjob.testing import FakeClock

pytestmark = pytest.mark.rules

TIMEOUT = 4.0


class Scene:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store: Store = create_store("memory://")
        self.tasks = BackgroundTasks()
        self.sessions: list[FakeSession] = []
        self.sl = SecondLevel(self.store, self.tasks, heartbeat_interval=1.0, heartbeat_timeout=TIMEOUT,
                              owns=lambda app: True, workers_of=lambda app: [s for s in self.sessions if s.app == app],
                              is_second_level=lambda job: job.schedule_type is ScheduleType.FIXED_RATE,
                              clock=self.clock, call_at=self.clock.call_at)

    async def job(self, name: str) -> int:
        spec = JobSpec(app=APP, name=name, handler=name, schedule_type=ScheduleType.FIXED_RATE, schedule_expr="0.1")
        return (await self.store.upsert_job(spec, None, self.clock.wall())).id

    def worker(self, worker_id: str, reported: list[int] | None = None) -> FakeSession:
        session = FakeSession(worker_id, last_received=self.clock.monotonic())
        self.sessions.append(session)
        self.sl.worker_joined(session, reported or [])  # type: ignore[arg-type]
        return session

    def leave(self, session: FakeSession) -> None:
        session.closed = True
        self.sessions.remove(session)
        self.sl.worker_left(session)  # type: ignore[arg-type]



@pytest.fixture
async def scene() -> AsyncIterator[Scene]:
    scene = Scene()
    await scene.store.open()
    try:
        yield scene
    finally:
        await scene.tasks.close()
        await scene.store.close()


async def test_each_job_goes_to_one_worker_the_least_loaded(scene: Scene) -> None:
    a, b = scene.worker("a"), scene.worker("b")
    jobs = [await scene.job(f"j{i}") for i in range(4)]
    await scene.clock.advance(0)
    await scene.sl.app_gained(APP)
    await scene.clock.advance(scene.sl.lease + scene.sl.margin + 0.1)  # the quiet period after gaining
    assert sorted(a.handed | b.handed) == jobs and not a.handed & b.handed
    assert len(a.handed) == len(b.handed) == 2
    assert all(kind == "SL_ASSIGN" for kind, _ in a.sent + b.sent)


async def test_a_departed_workers_jobs_move_only_when_its_lease_is_surely_out(scene: Scene) -> None:
    job = await scene.job("j")
    first = scene.worker("first")
    await scene.sl.app_gained(APP)
    await scene.clock.advance(scene.sl.lease + scene.sl.margin + 0.1)
    assert first.handed == {job}
    second = scene.worker("second")
    first.last_received = scene.clock.monotonic()
    scene.leave(first)
    await scene.clock.advance(scene.sl.lease + scene.sl.margin - 0.05)
    assert second.handed == set(), "the first worker may still run it within its lease"
    await scene.clock.advance(0.1)
    assert second.handed == {job}


async def test_after_a_gain_a_reporting_runner_keeps_its_job_and_nothing_else_is_assigned_early(
        scene: Scene) -> None:
    kept, fresh = await scene.job("kept"), await scene.job("fresh")
    await scene.sl.app_gained(APP)
    runner = scene.worker("runner", reported=[kept])  # it ran `kept` for the previous owner
    other = scene.worker("other")
    assert runner.handed == {kept} and other.handed == set(), "only what a runner reports, in the quiet period"
    await scene.clock.advance(scene.sl.lease + scene.sl.margin + 0.1)
    assert fresh in runner.handed | other.handed and kept not in other.handed


async def test_an_app_that_never_had_an_owner_hands_its_jobs_out_at_once(scene: Scene) -> None:
    job = await scene.job("j")
    worker = scene.worker("w")
    await scene.sl.app_gained(APP, fresh=True)  # no previous owner: no runner can be out there
    assert worker.handed == {job}


async def test_a_job_handed_again_is_marked_as_possibly_run_so_no_runner_repeats_its_fire(scene: Scene) -> None:
    job = await scene.job("j")
    first = scene.worker("first")
    await scene.sl.app_gained(APP, fresh=True)
    [(_, body)] = first.sent
    assert body["job"]["last_run_at"] is None and body["job"]["anchor"] is not None
    second = scene.worker("second")
    first.last_received = scene.clock.monotonic()
    scene.leave(first)  # gone before any report of its runs arrived
    await scene.clock.advance(scene.sl.lease + scene.sl.margin + 0.1)
    [(_, body)] = second.sent
    assert body["job"]["id"] == job and body["job"]["last_run_at"] is not None


# ---- where a newly held job fires first (second_level_runner.first_planned) -----------------------
def test_first_planned_runs_a_new_job_at_once_and_a_job_that_ran_at_its_next_grid_point() -> None:
    rate = {"id": 5, "schedule_type": "fixed_rate", "period": 2.0, "anchor": 100.0}
    origin = grid_origin(rate, 103.5)
    assert 100.0 <= origin < 102.0 and origin == grid_origin(rate, 999.0)  # every runner: the same grid
    assert first_planned(rate, None, 103.5, origin) == 103.5  # never ran: at once
    assert first_planned(rate, 99.0, 103.5, origin) == 103.5  # ran before its schedule took effect: anew
    assert first_planned(rate, None, 90.0, origin) == 100.0  # declared to start later
    after = first_planned(rate, 103.0, 103.5, origin)  # ran: its next grid point
    assert 103.5 <= after < 105.5 and (after - origin) / 2.0 == round((after - origin) / 2.0)
    point = origin + 2 * 2.0  # a new runner just after its predecessor ran a grid point: not that one again
    assert first_planned(rate, point + 0.0001, point + 0.0002, origin) == pytest.approx(point + 2.0)
    delay = dict(rate, schedule_type="fixed_delay")
    assert first_planned(delay, None, 103.5, origin) == 103.5
    assert first_planned(delay, 103.0, 103.5, origin) == 105.0
    assert first_planned(delay, 100.5, 103.5, origin) == 103.5
    old_server = {"id": 5, "schedule_type": "fixed_rate", "period": 2.0}  # no anchor: a phase of the period
    assert 103.5 <= first_planned(old_server, None, 103.5, grid_origin(old_server, 103.5)) < 105.5


def test_next_on_grid_steps_from_a_planned_point_to_the_next_one() -> None:
    assert next_on_grid(10.0, 0.1, 10.3, strictly=True) == pytest.approx(10.4)  # 10.3: on the grid (float error)
    assert next_on_grid(10.0, 0.1, 10.3, strictly=False) == pytest.approx(10.3)
    assert next_on_grid(10.0, 0.1, 10.35, strictly=False) == pytest.approx(10.4)
    assert next_on_grid(10.0, 0.1, 9.0, strictly=True) == 10.0
    origin = planned = 1_796_097_336.7826  # epoch seconds: float error ~2e-7 s at every step
    for _ in range(1000):
        step = next_on_grid(origin, 0.2, planned, strictly=True)
        assert step - planned == pytest.approx(0.2, abs=1e-5), "a point on the grid taken for one before it"
        planned = step
