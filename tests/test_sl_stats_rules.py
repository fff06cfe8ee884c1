"""Totals and the sampled run history of second-level jobs (server/sl_stats.py), in one process."""
from __future__ import annotations

import pytest
from fakes import APP

from fastjob.context import RUN_LOG_CHARS, RUN_LOG_LINES
from fastjob.models import JobRow, JobSpec, ScheduleType
from fastjob.server.sl_stats import (
    MAX_ERROR,
    NOTABLE_PER_WRITE,
    SUCCESS_SAMPLE_EVERY,
    SecondLevelStats,
    merge_report,
    run_from_wire,
)
from fastjob.store import create_store
from fastjob.tasks import BackgroundTasks

pytestmark = pytest.mark.rules


def report(runs: int, failures: int = 0, since: float = 1.0, **more: object) -> dict[str, object]:
    return {"job_id": 1, "runs": runs, "failures": failures, "skipped": 0, "since": since, "last_error": None,
            "last_run_at": 50.0 + runs, **more}


def test_totals_count_on_across_runners_and_a_repeated_report_counts_nothing_twice() -> None:
    stats = merge_report(None, report(5, 1), "a")
    stats = merge_report(stats, report(8, 1), "a")
    stats = merge_report(stats, report(8, 1), "a")  # the same report again
    assert (stats["runs"], stats["failures"]) == (8, 1)
    stats = merge_report(stats, report(3), "b")  # another worker took over: its counts start at 0
    assert (stats["runs"], stats["failures"]) == (11, 1)
    stats = merge_report(stats, report(2, since=9.0), "a")  # the first worker, restarted
    assert stats["runs"] == 13 and stats["runner"] == ["a", 9.0]
    assert merge_report(stats, report(0, since=9.0, last_run_at=None), "a")["last_run_at"] == 52.0
    # stats stored before totals were that runner's own count: its next report is not added to them
    assert merge_report({"runs": 40, "failures": 2}, report(41, 2), "a")["runs"] == 41


def test_a_reported_run_no_column_could_hold_is_dropped_and_long_fields_are_cut() -> None:
    job = JobRow(1, APP, "j", "h", ScheduleType.FIXED_RATE, "1", "UTC", None, None, 0, 1.0, "fire_once", [],
                 "round_robin", False, True, "queue", 3600.0, 100, None, 0.0, 0.0, None, False, 1)
    assert run_from_wire(job, "w", _run(float("nan"), "failed")) is None
    assert run_from_wire(job, "w", _run(1.0, "exploded")) is None
    long = run_from_wire(job, "w", _run(1.0, "failed", error="x" * 100_000, logs=[[1.0, "INFO", "y" * 5000]] * 50))
    assert long is not None and len(long.error or "") == MAX_ERROR
    assert len(long.logs) == RUN_LOG_LINES and len(long.logs[0][2]) == RUN_LOG_CHARS


async def test_plain_successful_runs_are_sampled_failures_and_logging_runs_kept() -> None:
    store = create_store("memory://")
    await store.open()
    tasks = BackgroundTasks()
    stats = SecondLevelStats(store, tasks, interval=3600)
    job = await store.upsert_job(JobSpec(app=APP, name="j", handler="h", schedule_type=ScheduleType.FIXED_RATE,
                                         schedule_expr="0.2"), None, 0.0)
    try:
        plain = [_run(t, "succeeded") for t in (0.0, 0.2, 0.4, SUCCESS_SAMPLE_EVERY + 1)]
        failed = [_run(t, "failed", error="boom") for t in range(NOTABLE_PER_WRITE + 3)]
        logged = [_run(0.6, "succeeded", logs=[[0.6, "INFO", "hi"]])]
        stats.on_report(job, "w", report(20, sampled=plain + logged))
        await stats.flush()
        kept = await store.list_job_runs(job.id)
        assert sorted(r.started_at for r in kept) == [0.0, 0.6, SUCCESS_SAMPLE_EVERY + 1]
        stats.on_report(job, "w", report(33, 13, sampled=failed))
        await stats.flush()
        kept = await store.list_job_runs(job.id)
        latest_failures = list(range(NOTABLE_PER_WRITE + 2, 2, -1))  # of a flood, the latest are kept
        assert [r.started_at for r in kept if r.status == "failed"] == latest_failures
        stored: JobRow | None = await store.get_job(job.id)
        assert stored is not None and stored.stats["runs"] == 33
    finally:
        await tasks.close()
        await store.close()


def _run(started: float, status: str, **more: object) -> dict[str, object]:
    return {"planned_at": started, "started_at": started, "duration": 0.01, "status": status, "error": None,
            "logs": [], **more}
