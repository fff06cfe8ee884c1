"""Pausing code-declared jobs that no live worker declares any more.

A worker declares, at each registration, the complete set of jobs its code defines (JOB_DECLARE,
the last batch marked ``final``). A job once declared in code and then removed from it would
otherwise keep firing, and failing, for ever. The owner of an app pauses such a job, with
``paused_by = undeclared`` and a WARNING naming it, once no live worker of the app has declared
it for ``grace`` seconds; declaring it again resumes it (store/job_writes.py).

What keeps this safe with workers of different job sets and rolling deploys:

* only jobs that code owns (``origin = code``) are considered: API jobs are never touched;
* the union of the live workers' sets counts: a job any live worker declares stays;
* nothing is judged while the app has no live worker, or while one of them has not finished
  declaring (an older worker that declares with JOB_UPSERT never finishes: its app is left alone);
* the grace runs from when this owner first saw the job undeclared, so a new owner after a
  failover starts it again: a failover can delay a pause, never hasten one.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable

from ..models import JobRow, Origin, PausedBy
from ..store import Store

log = logging.getLogger("fastjob.reconcile")

#: What the owner knows of an app's live workers: each one's complete declared set, or None when
#: nothing can be judged (no live worker, or one still declaring).
Declarations = Callable[[str], list[Collection[str]] | None]


class Reconciler:
    """One owner's bookkeeping of undeclared jobs; :meth:`check` is one pass over its apps."""

    def __init__(self, store: Store, grace: float, owned: Callable[[], Iterable[str]], declarations: Declarations,
                 changed: Callable[[JobRow], None]) -> None:
        """``changed`` is told of each job paused or resumed (the scheduler and second-level
        placement follow it)."""
        self._store = store
        self.grace = grace
        self._owned = owned
        self._declarations = declarations
        self._changed = changed
        self._undeclared_since: dict[str, dict[str, float]] = {}  # app -> job name -> first seen undeclared

    @property
    def interval(self) -> float:
        """How often to check: a tenth of the grace, between 1 and 30 seconds."""
        return min(30.0, max(1.0, self.grace / 10))

    async def check(self, now: float) -> list[JobRow]:
        """Pause what has been undeclared for the grace; returns the jobs paused."""
        if self.grace <= 0:
            return []
        owned = set(self._owned())
        for app in set(self._undeclared_since) - owned:
            del self._undeclared_since[app]
        paused: list[JobRow] = []
        for app in sorted(owned):
            paused.extend(await self._check_app(app, now))
        return paused

    async def _check_app(self, app: str, now: float) -> list[JobRow]:
        sets = self._declarations(app)
        if not sets:
            self._undeclared_since.pop(app, None)
            return []
        declared = set().union(*sets)
        jobs = await self._store.list_jobs(app)
        undeclared = {job.name for job in jobs
                      if job.origin == Origin.CODE.value and job.enabled and job.name not in declared}
        since = self._undeclared_since.setdefault(app, {})
        for name in set(since) - undeclared:
            del since[name]
        for name in undeclared:
            since.setdefault(name, now)
        due = sorted(name for name, first in since.items() if now - first >= self.grace)
        if due:  # read again: a worker may have declared them while the jobs were read
            sets = self._declarations(app)
            due = [name for name in due if name not in set().union(*sets)] if sets else []
        if not due or not sets:
            return []
        paused = await self._store.pause_jobs(app, due, PausedBy.UNDECLARED, now)
        for job in paused:
            log.warning("job %r of app %r paused: none of its %d live workers has declared it for %.0fs;"
                        " declaring it again resumes it", job.name, app, len(sets), now - since.pop(job.name))
            self._changed(job)
        # a worker that declared one of them while the pause was written wrote nothing (it found it
        # enabled and unchanged): resume it, as its declaration would have
        sets = self._declarations(app) or []
        declared_meanwhile = [job.name for job in paused if any(job.name in names for names in sets)]
        if declared_meanwhile:
            for job in await self._store.resume_jobs(app, declared_meanwhile, PausedBy.UNDECLARED, now):
                log.warning("job %r of app %r resumed: a worker declared it while it was being paused", job.name, app)
                self._changed(job)
        return paused
