"""Alarms: a webhook receiver on 127.0.0.1 gets exactly one alarm per failed instance across a
two-server cluster, none inside a silence window, within 2 s; a dead webhook does not slow
dispatch. The rules (events, silence, threshold, dead-man) in one process."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web
from harness import FAST_CLUSTER_ARGS, wait_until

from fastjob import Worker
from fastjob.models import InstanceRow, JobRow, ScheduleType, Status
from fastjob.server.alarms import FORMATTERS, AlarmRules, Webhook


class Receiver:
    """A webhook on 127.0.0.1 that records what it is sent, and when."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.append((time.time(), await request.json()))
        return web.Response(text="ok")

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def receiver() -> Any:
    hook = Receiver()
    await hook.start()
    yield hook
    await hook.stop()


async def test_one_alarm_per_failed_instance_across_two_servers(servers, db_url, receiver):
    args = [*FAST_CLUSTER_ARGS, "--alarm-webhook", receiver.url]
    first = await servers.start(db_url, *args)
    await servers.start(db_url, *args)
    worker = Worker(app="billing", servers=[first.address], reconnect_max=0.5)
    failed_at: dict[int, float] = {}

    @worker.handler("bad")
    async def bad(ctx: Any) -> None:
        failed_at[ctx.instance_id] = time.time()
        raise RuntimeError("no luck")

    worker.schedule("bad")
    worker.schedule("hushed", handler="bad", alarm={"silence": 60})
    worker.schedule("retried", handler="bad", retries=1, retry_backoff=0.05)
    async with worker:
        ids = [await worker.trigger("bad") for _ in range(3)]
        await wait_until(lambda: len(receiver.received) >= 3, 10, "three alarms")
        hushed = [await worker.trigger("hushed") for _ in range(3)]
        retried = await worker.trigger("retried")
        await wait_until(lambda: len(failed_at) == 8, 10, "every fire and retry ran")
        await asyncio.sleep(2.0)  # time for any duplicate or unsilenced alarm to arrive
    events = [event for _, event in receiver.received]
    assert sorted(e["instance"] for e in events if e["job"] == "bad") == sorted(ids)  # once each
    assert len({e["event_id"] for e in events}) == len(events)
    assert [e["instance"] for e in events if e["job"] == "hushed"] == [hushed[0]]  # then silenced
    after_retries = [e for e in events if e["job"] == "retried"]  # only when no retry is left
    assert [(e["attempt"], e["instance"] != retried) for e in after_retries] == [(2, True)]
    for at, event in receiver.received:
        assert event["event"] == "failed" and event["app"] == "billing" and "no luck" in event["error"]
        assert at - failed_at[event["instance"]] < 2.0  # the target: within 2 s


async def test_a_dead_webhook_does_not_slow_dispatch(servers, sqlite_url):
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    dead = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = dead.sockets[0].getsockname()[1]
    try:
        server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS, "--alarm-webhook", f"http://127.0.0.1:{port}/x")
        worker = Worker(app="billing", servers=[server.address], reconnect_max=0.5)
        done: list[float] = []

        @worker.handler("bad")
        async def bad(ctx: Any) -> None:
            done.append(time.time())
            raise RuntimeError("no")

        worker.schedule("bad")
        async with worker:
            started = time.time()
            for _ in range(40):
                await worker.trigger("bad")
            await wait_until(lambda: len(done) == 40, 10, "every fire ran while the webhook hangs")
            assert max(done) - started < 3.0
    finally:
        dead.close()


# ---- the rules --------------------------------------------------------------------------------
def _job(alarm: dict[str, Any] | None = None, job_id: int = 1) -> JobRow:
    return JobRow(job_id, "a", "j", "h", ScheduleType.API, "", "UTC", None, None, 0, 1.0, "fire_once", [],
                  "round_robin", False, True, "queue", 3600.0, 100, None, 0.0, 0.0, None, False, 1, alarm=alarm)


def _row(instance_id: int) -> InstanceRow:
    return InstanceRow(instance_id, 1, "a", 1000, 1, Status.FAILED, "api", None, "s", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_events_silence_and_thresholds():
    clock = Clock()
    rules = AlarmRules([Webhook("http://x/a"), Webhook("http://x/b", "slack")], "s1", lambda i: f"/i/{i}", clock)
    assert len(rules.instance_event("failed", _job(), _row(1), "boom", "failed")) == 2  # one row per webhook
    assert rules.instance_event("skipped", _job(), _row(2), None, "skipped") == []  # not a default event
    assert rules.instance_event("skipped", _job({"on": ["skipped"]}), _row(3), None, "skipped") != []
    quiet = _job({"silence": 10}, job_id=2)
    assert rules.instance_event("failed", quiet, _row(4), None, "failed") != []
    clock.now += 5
    assert rules.instance_event("failed", quiet, _row(5), None, "failed") == []
    clock.now += 6
    assert rules.instance_event("failed", quiet, _row(6), None, "failed") != []
    third = _job({"threshold": [3, 60]}, job_id=3)
    got = [bool(rules.instance_event("failed", third, _row(10 + n), None, "failed")) for n in range(3)]
    assert got == [False, False, True]
    clock.now += 100  # outside the window: counting starts over
    assert not rules.instance_event("failed", third, _row(20), None, "failed")
    assert AlarmRules([], "s1", str, clock).instance_event("failed", _job(), _row(1), None, "failed") == []


def test_dead_man_alarms_once_per_silent_period():
    clock = Clock()
    rules = AlarmRules([Webhook("http://x/a")], "s1", str, clock)
    watched = _job({"on": ["dead_man"], "dead_man": 60})
    assert rules.dead_men([watched], since=lambda job: 1000.0) == []
    clock.now += 61
    assert len(rules.dead_men([watched], since=lambda job: 1000.0)) == 1
    assert rules.dead_men([watched], since=lambda job: 1000.0) == []  # not again until another period
    rules.last_success[watched.id] = clock.now
    clock.now += 30
    assert rules.dead_men([watched], since=lambda job: 1000.0) == []


def test_webhook_forms_and_the_slack_body():
    assert Webhook.parse("https://h/x") == Webhook("https://h/x", "json")
    assert Webhook.parse("slack=https://hooks.slack.com/x") == Webhook("https://hooks.slack.com/x", "slack")
    with pytest.raises(ValueError):
        Webhook.parse("ftp://nope")
    body = FORMATTERS["slack"]({"event": "failed", "app": "a", "job": "j", "instance": 7, "attempt": 2,
                                "error": "boom", "link": "http://s/i/7"})
    assert set(body) == {"text"} and "failed" in body["text"] and "boom" in body["text"]


def test_late_after_and_dead_man_imply_their_events_and_dead_man_ignores_the_threshold():
    clock = Clock()
    rules = AlarmRules([Webhook("http://x/a")], "s1", str, clock)
    late = _job({"late_after": 1})
    assert rules.instance_event("late", late, _row(1), "late", "running") != []
    watched = _job({"dead_man": 60, "threshold": [3, 3600]}, job_id=2)
    clock.now += 61
    assert len(rules.dead_men([watched], since=lambda job: 1000.0)) == 1  # not the 3rd of 3: at once
    rules.last_success.clear()
    clock.now += 1000
    assert rules.dead_men([watched], since=lambda job: clock.now - 1) == []  # a later sign of life counts
