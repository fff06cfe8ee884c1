"""Second-level jobs with real processes: rate, worker failover, server restart, no double runners."""
from __future__ import annotations

import asyncio
from itertools import pairwise
from pathlib import Path

import pytest
from harness import FAST_CLUSTER_ARGS, WorkerProcess, wait_until

from fastjob import Worker

PERIOD = 0.2
TIMEOUT = 1.5  # the heartbeat timeout in FAST_CLUSTER_ARGS


def read_ticks(path: Path) -> list[tuple[str, float]]:
    """(worker, start time) of every run, in start order."""
    return [(worker, start) for worker, start, _ in read_runs(path)]


def read_runs(path: Path) -> list[tuple[str, float, float]]:
    """(worker, start time, planned time) of every run, in start order."""
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            runs.append((parts[0], float(parts[1]), float(parts[2])))
    return sorted(runs, key=lambda r: r[1])


def assert_one_runner_at_a_time(ticks: list[tuple[str, float]]) -> None:
    """Runs never interleave between workers, and no two runs share a period."""
    order = [w for w, _ in ticks]
    switches = [i for i in range(1, len(order)) if order[i] != order[i - 1]]
    for i in switches:
        assert order[i - 1] not in order[i:], f"worker {order[i - 1]} ran again after {order[i]} took over"
    gaps = [b - a for (_, a), (_, b) in pairwise(ticks)]
    assert min(gaps) > PERIOD / 2, f"two runs within half a period: {min(gaps):.3f}s"


@pytest.fixture
async def workers(tmp_path):
    started: list[WorkerProcess] = []

    async def start(server: str, worker_id: str) -> WorkerProcess:
        proc = WorkerProcess(server, worker_id, tmp_path / "ticks.txt", PERIOD, tmp_path / f"{worker_id}.log")
        started.append(proc)
        await proc.start()
        return proc

    try:
        yield start
    finally:
        for proc in started:
            await proc.close()


async def server_with_two_runners(servers, workers, db: str, tmp_path: Path):
    """A server and two worker processes of app 'sl'; returns once the 0.2 s job has run 3 times."""
    server = await servers.start(db, *FAST_CLUSTER_ARGS)
    procs = {"a": await workers(server.address, "a"), "b": await workers(server.address, "b")}
    ticks_file = tmp_path / "ticks.txt"
    await wait_until(lambda: len(read_ticks(ticks_file)) >= 3, 10, "the first runs")
    return server, procs, ticks_file


async def test_runs_at_its_rate_on_one_worker(servers, workers, sqlite_url, tmp_path):
    server, _, ticks_file = await server_with_two_runners(servers, workers, sqlite_url, tmp_path)
    await wait_until(lambda: len(read_runs(ticks_file)) >= 15, 15, "fifteen runs")
    runs = read_runs(ticks_file)
    # fixed rate: the first run at once, then on the planned grid every period exactly once, none skipped,
    # none twice
    gaps = [round(b[2] - a[2], 3) for a, b in pairwise(runs[1:])]
    assert gaps == [PERIOD] * len(gaps), gaps
    assert len({w for w, _, _ in runs}) == 1, "only one worker runs the job"
    assert_one_runner_at_a_time(read_ticks(ticks_file))
    # outcomes are reported and stored with the job
    async with Worker(app="sl", servers=[server.address], role="client") as client:
        job = await wait_until(lambda: _job_with_stats(client), 10, "a stored outcome report")
        assert job["stats"]["runs"] >= 10 and job["stats"]["failures"] == 0
        assert job["stats"]["skipped"] == 0, "a quick handler on an idle worker misses no period"
        assert job["next_trigger_ms"] is None, "no WAL rows for a second-level job"
        assert await client.list_instances(job="tick") == []


async def _job_with_stats(client: Worker):
    job = await client.get_job("tick")
    return job if job.get("stats") and job["stats"]["runs"] >= 10 else None


async def test_kill_9_worker_hands_job_to_the_other(servers, workers, sqlite_url, tmp_path):
    server, procs, ticks_file = await server_with_two_runners(servers, workers, sqlite_url, tmp_path)
    runner = read_ticks(ticks_file)[-1][0]
    other = "b" if runner == "a" else "a"
    procs[runner].kill()
    await procs[runner].close()
    killed_at = read_ticks(ticks_file)[-1][1]
    ticks = await wait_until(
        lambda: (t := read_ticks(ticks_file)) and sum(1 for w, _ in t if w == other) >= 3 and t, 10,
        "the other worker to take over")
    first_other = min(s for w, s in ticks if w == other)
    assert first_other - killed_at <= TIMEOUT + PERIOD, f"handover took {first_other - killed_at:.2f}s"
    assert_one_runner_at_a_time(ticks)
    assert_one_grid(read_runs(ticks_file))


def assert_one_grid(runs: list[tuple[str, float, float]]) -> None:
    """Every run after the first (which runs at once), whichever worker ran it, was planned on one grid."""
    grid = runs[1][2]
    offsets = [round((planned - grid) / PERIOD, 3) for _, _, planned in runs[1:]]
    assert all(offset == int(offset) for offset in offsets), f"the grid moved: {offsets}"


async def test_server_restart_keeps_the_job_running(servers, workers, sqlite_url, tmp_path):
    server, _, ticks_file = await server_with_two_runners(servers, workers, sqlite_url, tmp_path)
    server.kill()
    await server.wait()
    restart_at = read_ticks(ticks_file)[-1][1]
    await servers.start(sqlite_url, *FAST_CLUSTER_ARGS, port=server.port)
    await wait_until(lambda: sum(1 for _, s in read_ticks(ticks_file) if s > restart_at + 2) >= 5, 15,
                     "runs after the restart")
    ticks = read_ticks(ticks_file)
    gaps = [b - a for (_, a), (_, b) in pairwise(ticks)]
    assert max(gaps) <= TIMEOUT + PERIOD, f"a gap of {max(gaps):.2f}s"
    assert_one_runner_at_a_time(ticks)


async def test_job_changes_reach_the_runner_and_jobs_wait_for_a_worker(servers, sqlite_url):
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS)
    seen: asyncio.Queue = asyncio.Queue()

    def make(worker_id: str) -> Worker:
        worker = Worker(app="sl", servers=[server.address], worker_id=worker_id, reconnect_max=0.3)

        @worker.handler("tick")
        async def tick(ctx):
            seen.put_nowait((worker_id, ctx.params))

        worker.schedule("tick", interval=PERIOD, params={"v": 1})
        return worker

    async def next_params(want, timeout=5.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            _, params = await asyncio.wait_for(seen.get(), max(0.01, deadline - asyncio.get_running_loop().time()))
            if params == want:
                return

    first = make("first")
    async with first:
        await next_params({"v": 1})
        job = await first.get_job("tick")
        await first.call("JOB_UPSERT", {"job": {"name": "tick", "handler": "tick", "schedule_type": "fixed_rate",
                                                 "schedule_expr": str(PERIOD), "params": {"v": 2}}})
        await next_params({"v": 2})  # new params reach the runner
        assert await first.set_enabled("tick", False)
        await wait_until(lambda: not first.second_level.jobs and not first.second_level._tasks, 5,
                         "the runner to drop the job and finish its last run")
        while not seen.empty():
            seen.get_nowait()
        await asyncio.sleep(3 * PERIOD)  # the observation window: disabled, nothing may run in it
        assert seen.empty()
        assert await first.set_enabled("tick", True)
        await next_params({"v": 2})
        assert job["id"] == (await first.get_job("tick"))["id"]
    # the only worker left: the job waits, then resumes on the next worker that registers
    while not seen.empty():
        seen.get_nowait()
    second = make("second")
    async with second:
        worker_id, _ = await asyncio.wait_for(seen.get(), 10)
        assert worker_id == "second"
        assert await second.delete_job("tick")
        await wait_until(lambda: not second.second_level.jobs and not second.second_level._tasks, 5,
                         "the runner to drop the job and finish its last run")
        while not seen.empty():
            seen.get_nowait()
        await asyncio.sleep(3 * PERIOD)  # the observation window: deleted, nothing may run in it
        assert seen.empty(), "a deleted job must stop running"


async def test_a_frozen_runner_wakes_without_its_job(servers, workers, sqlite_url, tmp_path):
    """SIGSTOP the runner past the timeout: the other worker takes over, and on SIGCONT the old one
    must not run the job again, although frames its server sent before the stop are still waiting."""
    import signal

    server, procs, ticks_file = await server_with_two_runners(servers, workers, sqlite_url, tmp_path)
    runner = read_ticks(ticks_file)[-1][0]
    other = "b" if runner == "a" else "a"
    procs[runner].signal(signal.SIGSTOP)
    await wait_until(lambda: sum(1 for w, _ in read_ticks(ticks_file) if w == other) >= 3, 10,
                     "the other worker to take over")
    procs[runner].signal(signal.SIGCONT)
    woke_at = read_ticks(ticks_file)[-1][1]
    await wait_until(lambda: sum(1 for _, s in read_ticks(ticks_file) if s > woke_at) >= 10, 10,
                     "runs after the wake-up")
    ticks = read_ticks(ticks_file)
    assert not [s for w, s in ticks if w == runner and s > woke_at], "the woken worker ran the job again"
    assert_one_runner_at_a_time(ticks)
