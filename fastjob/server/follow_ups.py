"""What a final status starts: a retry, a re-run, or a fixed-delay job's next fire.

A failed or timed-out attempt with retries left is followed by attempt + 1 of the same fire
after the job's backoff; an interrupted one (its worker stopped, died or was lost) by a re-run
at once, up to MAX_RERUNS, without using up a retry. Each follow-up is written to the WAL
before it enters the wheel, under the epoch the app is owned at when it is written. A fixed-delay
job's chain lives in the job's ``next_trigger_ms``: a finish sets it to finish + delay, and the
scan claims it like any fire.
"""
from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

from .. import schedule
from ..clock import Clock, wall_ms
from ..models import MAX_RERUNS, InstanceRow, JobRow, ScheduleType, Status
from ..store import NotOwnerError, Store, StoreError
from ..tasks import BackgroundTasks
from .fires import EnterWheel, StartTurns
from .lines import JobLines

log = logging.getLogger("fastjob.scheduler")

RETRY = "retry"
RERUN = "rerun"


def follow_up(row: InstanceRow, status: Status, job: JobRow | None) -> str | None:
    """RETRY (a failure with retries left), RERUN (an interruption), or None."""
    if job is None:
        return None
    if status in (Status.FAILED, Status.TIMED_OUT) and row.attempt - row.reruns <= job.retry_times:
        return RETRY
    if status is Status.INTERRUPTED and row.reruns < MAX_RERUNS:
        return RERUN
    return None


class FollowUps:
    """Writes retries, re-runs and fixed-delay chain links for the apps this server owns."""

    def __init__(
        self,
        *,
        store: Store,
        server_id: str,
        epoch_of: Callable[[str], int | None],
        lines: JobLines,
        jobs: dict[int, JobRow],
        tasks: BackgroundTasks,
        enter_wheel: EnterWheel,
        start_turns: StartTurns,
        wake_scan: Callable[[], None],
        is_second_level: Callable[[JobRow], bool],
        clock: Clock,
    ) -> None:
        self.store = store
        self.server_id = server_id
        self.epoch_of = epoch_of  # the epoch we own an app at, None once it moved
        self.lines = lines
        self.jobs = jobs
        self.tasks = tasks
        self.enter_wheel = enter_wheel
        self.start_turns = start_turns
        self.wake_scan = wake_scan
        self.is_second_level = is_second_level
        self.clock = clock
        self._writing: dict[str, set[asyncio.Task[None]]] = {}  # retries/re-runs being written, by app

    def writing(self, app: str) -> list[asyncio.Task[None]]:
        """The app's follow-ups not written yet (a hand-over waits for them)."""
        return list(self._writing.get(app, ()))

    def spawn(self, row: InstanceRow, job: JobRow, follow: str, key: Any) -> None:
        """Write the follow-up in the background; ``key`` holds the job's line meanwhile (None: nothing held)."""
        task = self.tasks.spawn(self._write(row, job, follow, key), f"fastjob-{follow}-{row.id}")
        tasks = self._writing.setdefault(row.app, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _write(self, row: InstanceRow, job: JobRow, follow: str, key: Any) -> None:
        """Write the WAL row of a retry or re-run (kept trying while we own the app), then wheel it."""
        rerun = follow == RERUN
        again: InstanceRow | None = None
        delay = 0.05
        created_at = self.clock.wall()  # one stamp for every try: a try that committed unheard is recognised
        try:
            while True:
                epoch = self.epoch_of(row.app)
                if epoch is None:
                    return  # the app moved: its new owner finds this row final and nothing after it
                try:
                    again = await self.store.insert_instance(
                        self.server_id, row.app, epoch, job.id, row.planned_ms, row.attempt + 1, follow,
                        row.params, created_at, reruns=row.reruns + int(rerun))
                    break
                except NotOwnerError:
                    return
                except StoreError as exc:
                    log.warning("instance %d: %s not written yet, will retry: %s", row.id, follow, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        finally:
            if again is None and key is not None:
                self.start_turns(self.lines.release(job.id, key))
        if again is None:
            return
        if key is not None:
            self.lines.replace(job.id, key, again.id)
        wait = 0.0 if rerun else schedule.retry_delay(job, row.attempt - row.reruns)
        log.info("instance %d: %s as %d (attempt %d) in %.2fs", row.id, follow, again.id, again.attempt, wait)
        self.enter_wheel(again, epoch, self.clock.monotonic() + wait)

    # ---- fixed delay ---------------------------------------------------------------------------
    def is_delay_chain(self, job: JobRow) -> bool:
        """Is this a live fixed-delay job whose next fire is chained to the previous finish?"""
        return (job.schedule_type is ScheduleType.FIXED_DELAY and not job.run_once and job.enabled
                and not job.is_delete and not self.is_second_level(job))

    def continue_chain(self, row: InstanceRow, job: JobRow, finished_at: float) -> None:
        self.tasks.spawn(self._continue_chain(row, job, finished_at), f"fastjob-chain-{row.id}")

    async def _continue_chain(self, row: InstanceRow, job: JobRow, finished_at: float) -> None:
        """A fixed delay's next fire is due ``period`` after this finish: the job's next_trigger_ms."""
        epoch = self.epoch_of(row.app)
        if epoch is None:
            return
        # the chain lives in one place, the job's next_trigger_ms: a re-enable or an edit that
        # also set it can never start a second chain, and the scan claims it like any fire
        period = schedule.parse_period(self.jobs.get(job.id, job).schedule_expr)
        next_ms = math.ceil((finished_at + period) * 1000)  # never before finish + delay
        await self.store.set_next_trigger(self.server_id, row.app, epoch, job.id, next_ms)
        self.wake_scan()

    async def settle_periodic_jobs(self, app: str, epoch: int, unfinished: list[InstanceRow]) -> None:
        """Rate and delay jobs whose next fire does not match who runs them, after a gain:

        * a fixed-delay job with no next fire and nothing in flight lost its chain in a crash;
        * a rate/delay job the server runs with no next fire and nothing in flight was run by a
          worker before (a lower ``--second-level-threshold`` now, or an upgrade that lowered its
          default);
        both start at once. A job a worker runs now (a higher threshold) loses its next fire, so
        that the server stops firing it too (fires already in the WAL still run)."""
        busy = {row.job_id for row in unfinished}
        for job in [j for j in self.jobs.values() if j.app == app]:
            periodic = job.schedule_type in (ScheduleType.FIXED_RATE, ScheduleType.FIXED_DELAY) and not job.run_once
            if not periodic or not job.enabled or job.is_delete:
                continue
            if self.is_second_level(job):
                if job.next_trigger_ms is not None:
                    log.info("job %s (%d): now run by a worker (period under --second-level-threshold)",
                             job.name, job.id)
                    await self.store.set_next_trigger(self.server_id, app, epoch, job.id, None)
                    job.next_trigger_ms = None
            elif job.next_trigger_ms is None and job.id not in busy:
                log.info("job %s (%d): run by the server and had no next fire; starting it", job.name, job.id)
                job.next_trigger_ms = wall_ms(self.clock)
                await self.store.set_next_trigger(self.server_id, app, epoch, job.id, job.next_trigger_ms)
