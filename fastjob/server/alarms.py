"""Alarms: which events of a job alarm, and their delivery to webhooks from the outbox.

An instance event (failed after all retries, timed out, skipped, no worker, late) is decided by
the app's owner, with the job's settings (``JobSpec.alarm``: which events, a silence window, a
threshold of N events in M seconds), and written to the outbox in the same transaction as the
status that raised it (the status writer carries both), one row per webhook. A dead-man alarm
(no success within a time) is raised by the owner's periodic check. Cluster alarms (an app with
no live owner, a takeover) are written by the server that sees them, under an event id that is
the same on every server, so the outbox takes each once.

The sender claims due rows (its apps' and the cluster's) by compare-and-set, posts them with a
timeout, records the delivery, or backs off and tries again; after MAX_ATTEMPTS it gives up. A
slow or dead webhook costs only the sender's own tasks, never the scheduler. Each alarm carries
a stable ``event_id``: a sender that dies between posting and recording makes it arrive twice,
and the receiver drops the repeat by that id.

Formatters turn the event into a webhook's body: ``json`` (the event itself) and ``slack`` (an
incoming webhook's ``{"text": ...}``). Another is a function in FORMATTERS and a prefix in
``--alarm-webhook NAME=URL``.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..models import DEFAULT_ALARM_EVENTS, InstanceRow, JobRow
from ..store import Store, StoreError
from ..store.base import AlarmRow

log = logging.getLogger("fastjob.alarms")

#: Seconds a sender holds a claimed alarm before another may try it: longer than a post can take
#: (POST_TIMEOUT), so a claim never lapses while its post runs.
CLAIM_LEASE = 60.0
POST_TIMEOUT = 5.0
MAX_ATTEMPTS = 12
#: Alarms one pass claims, and how many posts run at once.
BATCH = 50
PARALLEL = 8
#: Seconds between two passes when nothing is due.
INTERVAL = 0.25
#: The error text an alarm carries at most.
MAX_ERROR = 2000


def _slack(event: dict[str, Any]) -> dict[str, Any]:
    parts = [f"*FastJob alarm: {event['event']}*", f"app `{event.get('app')}`"]
    if event.get("job"):
        parts.append(f"job `{event['job']}`")
    if event.get("instance"):
        parts.append(f"instance {event['instance']} (attempt {event.get('attempt')})")
    text = ", ".join(parts)
    if event.get("error"):
        text += f"\n> {event['error'][:500]}"
    if event.get("link"):
        text += f"\n<{event['link']}|details>"
    return {"text": text}


#: How each kind of webhook wants an alarm's body.
FORMATTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"json": lambda event: event, "slack": _slack}


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    format: str = "json"

    @property
    def id(self) -> str:
        """The same on every server given the same URL (the outbox's key with the event id)."""
        return hashlib.sha256(f"{self.format}:{self.url}".encode()).hexdigest()[:16]

    @classmethod
    def parse(cls, text: str) -> Webhook:
        """``URL`` (JSON) or ``FORMAT=URL`` (a FORMATTERS name, e.g. slack=https://hooks.slack.com/...)."""
        fmt, sep, url = text.partition("=")
        if not sep or fmt not in FORMATTERS:
            fmt, url = "json", text
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--alarm-webhook wants an http(s) URL, got {text!r}")
        return cls(url, fmt)


class AlarmRules:
    """The owner's decisions: does this event of this job alarm now (settings, silence, threshold)?"""

    def __init__(self, webhooks: list[Webhook], server_id: str, link: Callable[[int], str],
                 clock: Callable[[], float] = time.time) -> None:
        self.webhooks = webhooks
        self.server_id = server_id
        self.link = link
        self.clock = clock
        self._recent: dict[tuple[int, str], collections.deque[float]] = {}  # (job, event) -> event times
        self._last_alarm: dict[tuple[int, str], float] = {}
        self.last_success: dict[int, float] = {}  # job id -> when it last succeeded (dead-man)

    def instance_event(self, event: str, job: JobRow | None, row: InstanceRow, error: str | None,
                       status: str) -> list[AlarmRow]:
        """The outbox rows of this event, or none (no webhook, not asked for, silenced, under the threshold)."""
        if not self.webhooks or job is None or not self._due(job, event):
            return []
        return self._rows(f"{event}:{row.id}", row.app, {
            "event": event, "app": row.app, "job": job.name, "job_id": job.id, "instance": row.id,
            "attempt": row.attempt, "status": status, "planned_at": row.planned_ms / 1000.0,
            "error": None if error is None else error[:MAX_ERROR], "link": self.link(row.id)})

    def dead_man(self, job: JobRow, silent_for: float) -> list[AlarmRow]:
        if not self.webhooks or not self._due(job, "dead_man"):
            return []
        now = self.clock()
        return self._rows(f"dead_man:{job.id}:{int(now)}", job.app, {
            "event": "dead_man", "app": job.app, "job": job.name, "job_id": job.id,
            "error": f"no success for {silent_for:.0f}s", "link": ""})

    def cluster_event(self, event: str, app: str, event_key: str, error: str) -> list[AlarmRow]:
        """An app with no live owner, a takeover: ``event_key`` is the same on every server."""
        return self._rows(f"{event}:{app}:{event_key}", None, {"event": event, "app": app, "error": error,
                                                             "link": ""})

    def _rows(self, event_id: str, app: str | None, event: dict[str, Any]) -> list[AlarmRow]:
        now = self.clock()
        event.update(event_id=event_id, at=now, server=self.server_id)
        return [AlarmRow(event_id, hook.id, app, event, now) for hook in self.webhooks]

    def _due(self, job: JobRow, event: str) -> bool:
        settings = job.alarm or {}
        implied = {"late"} if "late_after" in settings else set()
        if "dead_man" in settings:
            implied.add("dead_man")
        if event not in settings.get("on", DEFAULT_ALARM_EVENTS) and event not in implied:
            return False
        now = self.clock()
        key = (job.id, event)
        count, window = (settings.get("threshold") or (1, 0)) if event != "dead_man" else (1, 0)
        times = self._recent.setdefault(key, collections.deque())
        times.append(now)
        while times and (len(times) > count or now - times[0] > window > 0):
            times.popleft()
        if len(times) < count:
            return False
        silence = settings.get("silence") or 0
        if now - self._last_alarm.get(key, -1e18) < silence:
            return False
        self._last_alarm[key] = now
        times.clear()
        return True

    def dead_men(self, jobs: list[JobRow], since: Callable[[JobRow], float]) -> list[AlarmRow]:
        """Dead-man alarms of the jobs that asked for one and had no success within it; ``since``
        gives the latest moment known to be fine otherwise (the app gained here, a worker's run)."""
        rows: list[AlarmRow] = []
        now = self.clock()
        for job in jobs:
            limit = (job.alarm or {}).get("dead_man")
            if not limit or not job.enabled or job.is_delete:
                continue
            silent_for = now - max(self.last_success.get(job.id, 0.0), since(job))
            if silent_for > limit:
                rows.extend(self.dead_man(job, silent_for))
                self.last_success[job.id] = now  # the next one after another full period of silence
        return rows


class AlarmSender:
    """Posts the outbox's due alarms of the apps this server owns (and the cluster's)."""

    def __init__(self, store: Store, server_id: str, webhooks: list[Webhook], owned: Callable[[], list[str]]) -> None:
        self.store = store
        self.server_id = server_id
        self.webhooks = {hook.id: hook for hook in webhooks}
        self.owned = owned
        self.delivered = 0
        self._session: aiohttp.ClientSession | None = None
        self._inflight: dict[str, int] = {hook_id: 0 for hook_id in self.webhooks}  # posts running, per webhook
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    sent = await self.send_due()
                except StoreError as exc:
                    log.warning("alarms: database unavailable, sending later: %s", exc)
                    sent = 0
                if sent < BATCH:
                    await asyncio.sleep(INTERVAL)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._session is not None:
                await self._session.close()

    async def send_due(self) -> int:
        """One pass: claim what is due for the webhooks with a free slot, and start posting it; a
        slow webhook holds only its own slots, never another's or the next pass."""
        free = [hook for hook, busy in self._inflight.items() if busy < PARALLEL]
        if not free:
            return 0
        claimed = await self.store.claim_alarms(self.server_id, self.owned(), time.time(), CLAIM_LEASE, BATCH,
                                                webhooks=free)
        for alarm in claimed:
            self._inflight[alarm.webhook] = self._inflight.get(alarm.webhook, 0) + 1
            task = asyncio.create_task(self._deliver_counted(alarm), name=f"fastjob-alarm-{alarm.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(claimed)

    async def _deliver_counted(self, alarm: AlarmRow) -> None:
        try:
            await self._deliver(alarm)
        except StoreError as exc:  # its claim lapses and it is sent again: at least once
            log.warning("alarm %s: delivery not recorded: %s", alarm.event_id, exc)
        finally:
            self._inflight[alarm.webhook] = self._inflight.get(alarm.webhook, 1) - 1

    async def _deliver(self, alarm: AlarmRow) -> None:
        hook = self.webhooks.get(alarm.webhook)
        if hook is None:  # not configured here (changed, or servers disagree): recorded, not stranded
            log.warning("alarm %s: its webhook %s is not configured on this server; dropped", alarm.event_id,
                        alarm.webhook)
            await self.store.finish_alarm(alarm.id, time.time(), True, 0.0, "webhook not configured on the sender",
                                          self.server_id)
            return
        error = await self._post(hook, alarm.payload)
        now = time.time()
        if error is None:
            self.delivered += 1
            await self.store.finish_alarm(alarm.id, now, True, 0.0, None, self.server_id)
        elif alarm.attempts + 1 >= MAX_ATTEMPTS:
            log.warning("alarm %s to webhook %s: giving up after %d attempts: %s", alarm.event_id, hook.id,
                        MAX_ATTEMPTS, error)  # the id: a webhook's URL may be a secret
            await self.store.finish_alarm(alarm.id, now, True, 0.0, f"gave up: {error}", self.server_id)
        else:
            backoff = min(2.0 ** alarm.attempts, 300.0)
            await self.store.finish_alarm(alarm.id, now, False, now + backoff, error, self.server_id)

    async def _post(self, hook: Webhook, event: dict[str, Any]) -> str | None:
        """None if the webhook took it (2xx), else why not."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT))
        try:
            async with self._session.post(hook.url, json=FORMATTERS[hook.format](event)) as answer:
                if 200 <= answer.status < 300:
                    return None
                return f"HTTP {answer.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:MAX_ERROR]
