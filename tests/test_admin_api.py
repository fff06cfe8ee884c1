"""The HTTP admin API against real fastjob-server processes (SQLite and MariaDB), with real workers."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from typing import Any

import aiohttp
import isolated_handlers
import pytest
from harness import FAST_CLUSTER_ARGS, wait_until

from fastjob import Worker
from fastjob.testing import ServerProcess

pytestmark = pytest.mark.slow

REGULAR = [*FAST_CLUSTER_ARGS, "--second-level-threshold", "0"]


class Api:
    """A thin client for the tests: every answer is (status, JSON body)."""

    def __init__(self, session: aiohttp.ClientSession, server: ServerProcess, token: str | None) -> None:
        self.session = session
        self.base = f"http://{server.http_address}"
        self.token = token

    def as_(self, token: str | None) -> Api:
        other = Api.__new__(Api)
        other.session, other.base, other.token = self.session, self.base, token
        return other

    async def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                   data: bytes | None = None) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        if self.token is not None:
            hdrs["Authorization"] = f"Bearer {self.token}"
        kwargs: dict[str, Any] = {"data": data} if data is not None else {"json": body}
        async with self.session.request(method, self.base + path, headers=hdrs, **kwargs) as answer:
            text = await answer.text()
            return answer.status, json.loads(text) if text else None

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200, **kw: Any) -> Any:
        got, payload = await self.call(method, path, body, **kw)
        assert got == status, (method, path, got, payload)
        return payload

    async def error(self, method: str, path: str, body: Any = None, status: int = 400, code: str = "invalid",
                    **kw: Any) -> str:
        got, payload = await self.call(method, path, body, **kw)
        assert got == status, (method, path, got, payload)
        assert set(payload) == {"error"} and payload["error"]["code"] == code, payload
        return str(payload["error"]["message"])


async def start(servers: Any, db: str, *args: str) -> ServerProcess:
    server = await servers.start(db, *REGULAR, *args)
    assert server.http_address
    return server


def make_worker(server: ServerProcess, app: str = "billing", **kw: Any) -> Worker:
    kw.setdefault("reconnect_max", 0.5)
    return Worker(app=app, servers=[server.address], **kw)


async def final_status(api: Api, instance_id: int, timeout: float = 10.0) -> dict[str, Any]:
    final = {"succeeded", "failed", "timed_out", "interrupted", "killed", "skipped", "cancelled"}

    async def done() -> Any:
        payload = await api.ok("GET", f"/api/v1/instances/{instance_id}")
        return payload if payload["instance"]["status"] in final else None

    return await wait_until(done, timeout, f"instance {instance_id} final")


# ---- every route, happy path ---------------------------------------------------------------------
async def test_routes_end_to_end(servers, db_url):
    server = await start(servers, db_url)
    worker = make_worker(server)
    ran: list[Any] = []

    @worker.handler("report")
    async def report(ctx):
        ctx.log.info("report for %s", ctx.params)
        ran.append(ctx.params)
        return {"rows": 3}

    async with aiohttp.ClientSession() as session, worker:
        api = Api(session, server, server.admin_token)
        assert (await api.as_(None).ok("GET", "/healthz"))["status"] == "ok"
        assert (await api.as_(None).ok("GET", "/readyz"))["status"] == "ready"
        doc = await api.as_(None).ok("GET", "/api/v1/openapi.json")
        assert doc["openapi"].startswith("3.") and "/api/v1/apps/{app}/jobs/{name}/trigger" in doc["paths"]

        created = await api.ok("POST", "/api/v1/apps/billing/jobs", {
            "name": "report", "handler": "report", "cron": "0 0 1 1 *", "retries": 3, "params": {"day": 1},
            "tags": [], "timeout": 30}, status=201)
        assert created["job"]["cron"] == "0 0 1 1 *" and created["job"]["retries"] == 3
        shown = await api.ok("GET", "/api/v1/apps/billing/jobs/report?next=3")
        assert len(shown["next_fires"]) == 3 and shown["next_fires"] == sorted(shown["next_fires"])
        listed = await api.ok("GET", "/api/v1/apps/billing/jobs?name=rep")
        assert [job["name"] for job in listed["jobs"]] == ["report"]
        patched = await api.ok("PATCH", "/api/v1/apps/billing/jobs/report", {"cron": "0 0 2 1 *", "retries": 1})
        assert patched["job"]["cron"] == "0 0 2 1 *" and patched["job"]["retries"] == 1
        assert patched["job"]["params"] == {"day": 1}  # untouched fields stay
        preview = await api.ok("POST", "/api/v1/apps/billing/jobs/preview?next=5",
                               {"name": "x", "interval": 60})
        fanout = await api.ok("POST", "/api/v1/apps/billing/jobs", {
            "name": "fanout", "handler": "report", "interval": 3600, "enabled": False, "mode": "broadcast",
            "min_success": 0.5}, status=201)
        assert (fanout["job"]["mode"], fanout["job"]["min_success"]) == ("broadcast", 0.5)
        fanout = await api.ok("PATCH", "/api/v1/apps/billing/jobs/fanout", {"min_success": 1})
        assert (fanout["job"]["mode"], fanout["job"]["min_success"]) == ("broadcast", 1.0)
        shown = await api.ok("GET", "/api/v1/apps/billing/jobs/fanout")
        assert (shown["job"]["mode"], shown["job"]["min_success"]) == ("broadcast", 1.0)
        assert (created["job"]["mode"], created["job"]["min_success"]) == ("single", 1.0)
        assert {"mode", "min_success"} <= set(doc["components"]["schemas"]["Job"]["properties"])
        assert (await api.ok("DELETE", "/api/v1/apps/billing/jobs/fanout"))["deleted"] is True
        assert len(preview["next_fires"]) == 5 and preview["next_fires"][1] - preview["next_fires"][0] == 60

        # trigger twice with one Idempotency-Key: one instance
        key = {"Idempotency-Key": "abc-1"}
        first = await api.ok("POST", "/api/v1/apps/billing/jobs/report/trigger", {"params": {"day": 9}}, headers=key)
        again = await api.ok("POST", "/api/v1/apps/billing/jobs/report/trigger", {"params": {"day": 9}}, headers=key)
        assert again == {"instance_id": first["instance_id"], "replayed": True}
        detail = await final_status(api, first["instance_id"])
        assert detail["instance"]["status"] == "succeeded" and detail["instance"]["result"] == {"rows": 3}
        assert detail["instance"]["lateness"] is not None and detail["instance"]["job"] == "report"
        assert [a["attempt"] for a in detail["attempts"]] == [1]
        assert ran == [{"day": 9}]
        page = await api.ok("GET", "/api/v1/apps/billing/instances?job=report&status=succeeded&limit=10")
        assert [row["id"] for row in page["instances"]] == [first["instance_id"]]
        logs = await api.ok("GET", f"/api/v1/instances/{first['instance_id']}/logs")
        assert [line["message"] for line in logs["lines"]] == ["report for {'day': 9}"]
        stats = await api.ok("GET", "/api/v1/apps/billing/stats?window=15m")
        assert stats["totals"].get("succeeded") == 1 and stats["lateness"]["count"] == 1

        workers = await api.ok("GET", "/api/v1/apps/billing/workers")
        assert [w["id"] for w in workers["workers"]] == [worker.worker_id]
        assert workers["workers"][0]["handlers"] == {"report": "async", "fastjob:workflow": "async"}
        cluster = await api.ok("GET", "/api/v1/cluster")
        assert cluster["apps"] == [{"name": "billing", "owner": cluster["server_id"], "epoch": 1,
                                    "since": cluster["apps"][0]["since"]}]
        history = await api.ok("GET", "/api/v1/cluster/history?app=billing")
        assert history["changes"][0]["to"] == cluster["server_id"] and history["changes"][0]["reason"] == "claimed"
        runs = await api.ok("GET", "/api/v1/apps/billing/jobs/report/runs")
        assert runs["runs"] == []

        paused = await api.ok("POST", "/api/v1/apps/billing/jobs/report/pause")
        assert paused["job"]["enabled"] is False and paused["job"]["paused_by"] == "operator"
        resumed = await api.ok("POST", "/api/v1/apps/billing/jobs/report/resume")
        assert resumed["job"]["enabled"] is True

        token = await api.ok("POST", "/api/v1/tokens", {"name": "ci", "role": "viewer", "apps": ["billing"]},
                             status=201)
        assert token["token"].startswith("fj_") and token["role"] == "viewer"
        listed_tokens = await api.ok("GET", "/api/v1/tokens")
        assert token["id"] in [t["id"] for t in listed_tokens["tokens"]]
        assert all("secret" not in json.dumps(t) and "token" not in t for t in listed_tokens["tokens"])
        await api.ok("DELETE", f"/api/v1/tokens/{token['id']}")
        await api.as_(token["token"]).error("GET", "/api/v1/apps/billing/jobs", status=401, code="unauthorized")

        await api.error("POST", "/api/v1/servers/nobody/drain", status=404, code="not_found")
        assert (await api.ok("POST", f"/api/v1/servers/{cluster['server_id']}/drain", {"undo": True}))["drain"] is False

        assert (await api.ok("DELETE", "/api/v1/apps/billing/jobs/report"))["deleted"] is True
        await api.error("GET", "/api/v1/apps/billing/jobs/report", status=404, code="not_found")
        audit = await api.ok("GET", "/api/v1/audit?app=billing")
        actions = [entry["action"] for entry in audit["entries"]]
        for action in ("job.create", "job.change", "job.trigger", "job.pause", "job.resume", "job.delete"):
            assert action in actions
        assert {entry["actor"] for entry in audit["entries"] if entry["via"] == "http"} == {"admin (first start)"}
        declared = [entry for entry in audit["entries"] if entry["via"] == "wire"]
        assert declared and declared[0]["actor"] == f"worker {worker.worker_id}"


# ---- bad input ------------------------------------------------------------------------------------
async def test_bad_input_gets_one_line_errors(servers, sqlite_url):
    server = await start(servers, sqlite_url)
    async with aiohttp.ClientSession() as session:
        api = Api(session, server, server.admin_token)
        jobs = "/api/v1/apps/billing/jobs"
        assert "cron" in await api.error("POST", jobs, {"name": "a", "cron": "61 * * * *"})
        assert "wrong type" in await api.error("POST", jobs, {"name": "a", "retries": "3"})
        assert "unknown job field" in await api.error("POST", jobs, {"name": "a", "cronn": "* * * * *"})
        assert "only one of" in await api.error("POST", jobs, {"name": "a", "cron": "* * * * *", "interval": 5})
        assert await api.error("POST", jobs, {"name": "a", "mode": "every"}) == (
            "job 'a': mode must be one of single, broadcast, got 'every'")
        assert await api.error("POST", jobs, {"name": "a", "mode": "broadcast", "min_success": 0}) == (
            "job 'a': min_success must be a fraction above 0 and at most 1, got 0")
        assert "wrong type" in await api.error("POST", jobs, {"name": "a", "min_success": "half"})
        await api.error("POST", jobs, data=b"{not json", headers={"Content-Type": "application/json"})
        await api.error("POST", jobs, [1, 2])
        await api.error("POST", jobs, {"name": "big", "params": "x" * (2 << 20)}, status=413, code="too_large")
        await api.error("GET", "/api/v1/apps/billing/instances?cursor=!!", code="invalid")
        await api.error("GET", "/api/v1/apps/billing/instances?limit=5000", code="invalid")
        await api.error("GET", "/api/v1/apps/billing/instances?status=bogus", code="invalid")
        await api.error("GET", "/api/v1/apps/billing/instances?since=yesterday", code="invalid")
        await api.error("GET", "/api/v1/apps/billing/stats?window=9y", code="invalid")
        await api.error("GET", "/api/v1/apps/nowhere/jobs/x", status=404, code="not_found")
        await api.error("GET", "/api/v1/instances/abc", code="invalid")
        await api.error("GET", "/api/v1/instances/999999", status=404, code="not_found")
        await api.error("GET", "/api/v1/no/such/route", status=404, code="not_found")
        await api.error("PUT", "/api/v1/cluster", status=405, code="method_not_allowed")
        await api.error("POST", "/api/v1/tokens", {"name": "x", "role": "root"})
        await api.ok("GET", "/healthz")  # still serving
    assert "Traceback" not in server.log_tail(400)


# ---- authentication and roles -----------------------------------------------------------------------
async def test_roles_and_scopes(servers, sqlite_url):
    server = await start(servers, sqlite_url)
    async with aiohttp.ClientSession() as session:
        admin = Api(session, server, server.admin_token)
        await admin.ok("POST", "/api/v1/apps/billing/jobs", {"name": "j", "handler": "h"}, status=201)
        await admin.ok("POST", "/api/v1/apps/other/jobs", {"name": "j", "handler": "h"}, status=201)

        async def token(role: str, apps: list[str] | None = None) -> Api:
            made = await admin.ok("POST", "/api/v1/tokens", {"name": role, "role": role, "apps": apps}, status=201)
            return admin.as_(made["token"])

        viewer, operator, scoped = await token("viewer"), await token("operator"), await token("admin", ["billing"])
        await viewer.ok("GET", "/api/v1/apps/billing/jobs")
        await viewer.error("POST", "/api/v1/apps/billing/jobs/j/trigger", status=403, code="forbidden")
        await viewer.error("POST", "/api/v1/apps/billing/jobs/j/pause", status=403, code="forbidden")
        await viewer.error("GET", "/api/v1/audit", status=403, code="forbidden")
        await operator.ok("POST", "/api/v1/apps/billing/jobs/j/trigger")
        await operator.ok("POST", "/api/v1/apps/billing/jobs/j/pause")
        await operator.error("POST", "/api/v1/apps/billing/jobs", {"name": "k"}, status=403, code="forbidden")
        await operator.error("DELETE", "/api/v1/apps/billing/jobs/j", status=403, code="forbidden")
        await operator.error("GET", "/api/v1/tokens", status=403, code="forbidden")
        await scoped.ok("PATCH", "/api/v1/apps/billing/jobs/j", {"retries": 2})
        await scoped.error("PATCH", "/api/v1/apps/other/jobs/j", {"retries": 2}, status=403, code="forbidden")
        await scoped.error("GET", "/api/v1/apps/other/jobs", status=403, code="forbidden")
        await scoped.error("GET", "/api/v1/tokens", status=403, code="forbidden")  # tokens are global
        await scoped.ok("GET", "/api/v1/audit?app=billing")
        await admin.as_(None).error("GET", "/api/v1/cluster", status=401, code="unauthorized")
        forged = admin.as_("fj_0000000000000000_nope")
        for _ in range(20):
            await forged.error("GET", "/api/v1/cluster", status=401, code="unauthorized")
        await forged.error("GET", "/api/v1/cluster", status=429, code="rate_limited")
        await admin.error("GET", "/api/v1/cluster", status=429, code="rate_limited")  # per client address
        await admin.ok("GET", "/healthz")


# ---- forwarding to the owner ------------------------------------------------------------------------
async def test_actions_are_forwarded_to_the_owner(servers, db_url):
    first = await start(servers, db_url)
    second = await start(servers, db_url)
    token = first.admin_token
    assert token is not None and second.admin_token is None  # one admin token per cluster
    worker = make_worker(first)
    started = asyncio.Event()

    @worker.handler("ping")
    async def ping(ctx):
        started.set()
        return "pong"

    async with aiohttp.ClientSession() as session, worker:
        at_first, at_second = Api(session, first, token), Api(session, second, token)
        await at_first.ok("POST", "/api/v1/apps/billing/jobs", {"name": "ping", "handler": "ping"}, status=201)
        cluster = await at_second.ok("GET", "/api/v1/cluster")
        owner = {app["name"]: app["owner"] for app in cluster["apps"]}["billing"]
        non_owner = at_second if owner == first.address else at_first
        fired = await non_owner.ok("POST", "/api/v1/apps/billing/jobs/ping/trigger")
        await asyncio.wait_for(started.wait(), 10)
        assert (await final_status(non_owner, fired["instance_id"]))["instance"]["status"] == "succeeded"
        workers = await non_owner.ok("GET", "/api/v1/apps/billing/workers")  # read at the owner
        assert workers["owner"] == owner and len(workers["workers"]) == 1

        # an app nobody owns is claimed by the server an action reaches: jobs before workers
        await at_second.ok("POST", "/api/v1/apps/fresh/jobs", {"name": "later", "handler": "h"}, status=201)
        apps = {app["name"]: app["owner"] for app in (await at_first.ok("GET", "/api/v1/cluster"))["apps"]}
        assert apps["fresh"] in (first.address, second.address)


# ---- kill, retry, overlap -----------------------------------------------------------------------------
async def test_kill_async_process_and_thread_handlers(servers, sqlite_url, tmp_path):
    server = await start(servers, sqlite_url)
    worker = make_worker(server)
    cancelled_at: list[float] = []
    running = asyncio.Event()

    @worker.handler("wait")
    async def wait(ctx):
        running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled_at.append(time.monotonic())
            raise

    worker.handler("spin", isolation="process")(isolated_handlers.spin)
    @worker.handler("block")
    def block(ctx):
        time.sleep(1.5)

    async with aiohttp.ClientSession() as session, worker:
        api = Api(session, server, server.admin_token)
        for name in ("wait", "spin", "block"):
            await api.ok("POST", "/api/v1/apps/billing/jobs", {"name": name, "handler": name}, status=201)
        fired = await api.ok("POST", "/api/v1/apps/billing/jobs/wait/trigger")
        await asyncio.wait_for(running.wait(), 10)
        asked = time.monotonic()
        killed = await api.ok("POST", f"/api/v1/instances/{fired['instance_id']}/kill")
        assert killed["status"] == "killed"
        assert cancelled_at and cancelled_at[0] - asked < 1.0  # the target: effect on the worker within 1 s
        assert (await final_status(api, fired["instance_id"]))["instance"]["status"] == "killed"

        pid_file = tmp_path / "spin.pid"
        spun = await api.ok("POST", "/api/v1/apps/billing/jobs/spin/trigger", {"params": {"pid_file": str(pid_file)}})
        await wait_until(pid_file.exists, 20, "the isolated handler's child process")
        await wait_until(lambda: _status(api, spun["instance_id"], "running"), 10, "spin running")
        killed = await api.ok("POST", f"/api/v1/instances/{spun['instance_id']}/kill")
        assert killed["status"] == "killed"
        await wait_until(lambda: not _alive(int(pid_file.read_text())), 5, "the child process ended")

        blocked = await api.ok("POST", "/api/v1/apps/billing/jobs/block/trigger")
        await wait_until(lambda: _status(api, blocked["instance_id"], "running"), 10, "block running")
        reason = await api.error("POST", f"/api/v1/instances/{blocked['instance_id']}/kill", status=409,
                                 code="conflict")
        assert "thread" in reason
        assert (await final_status(api, blocked["instance_id"]))["instance"]["status"] == "succeeded"
        await api.error("POST", f"/api/v1/instances/{blocked['instance_id']}/kill", status=409, code="conflict")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _status(api: Api, instance_id: int, status: str) -> bool:
    return (await api.ok("GET", f"/api/v1/instances/{instance_id}"))["instance"]["status"] == status


async def test_kill_before_start_cancels_and_retry_runs_again(servers, sqlite_url):
    server = await start(servers, sqlite_url, "--scan-horizon", "5")
    worker = make_worker(server)
    attempts: list[int] = []

    @worker.handler("flaky")
    async def flaky(ctx):
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first time fails")
        return "ok"

    async with aiohttp.ClientSession() as session, worker:
        api = Api(session, server, server.admin_token)
        await api.ok("POST", "/api/v1/apps/billing/jobs",
                     {"name": "later", "handler": "flaky", "at": time.time() + 4}, status=201)
        waiting = await wait_until(lambda: _first_instance(api, "later"), 10, "the one-shot written to the WAL")
        assert waiting["status"] == "waiting"
        assert (await api.ok("POST", f"/api/v1/instances/{waiting['id']}/kill"))["status"] == "cancelled"
        assert (await final_status(api, waiting["id"]))["instance"]["status"] == "cancelled"

        await api.ok("POST", "/api/v1/apps/billing/jobs", {"name": "flaky", "handler": "flaky"}, status=201)
        fired = await api.ok("POST", "/api/v1/apps/billing/jobs/flaky/trigger")
        assert (await final_status(api, fired["instance_id"]))["instance"]["status"] == "failed"
        again = await api.ok("POST", f"/api/v1/instances/{fired['instance_id']}/retry")
        assert again["attempt"] == 2
        detail = await final_status(api, again["instance_id"])
        assert detail["instance"]["status"] == "succeeded"
        assert [a["attempt"] for a in detail["attempts"]] == [1, 2]
        assert attempts == [1, 2]


async def _first_instance(api: Api, job: str) -> Any:
    rows = (await api.ok("GET", f"/api/v1/apps/billing/instances?job={job}"))["instances"]
    return rows[0] if rows else None


async def test_trigger_obeys_overlap_unless_forced(servers, sqlite_url):
    server = await start(servers, sqlite_url)
    worker = make_worker(server)
    release = asyncio.Event()
    started: list[int] = []

    @worker.handler("long")
    async def long(ctx):
        started.append(ctx.instance_id)
        await asyncio.wait_for(release.wait(), 20)

    async with aiohttp.ClientSession() as session, worker:
        api = Api(session, server, server.admin_token)
        await api.ok("POST", "/api/v1/apps/billing/jobs", {"name": "long", "handler": "long", "overlap": "skip"},
                     status=201)
        first = await api.ok("POST", "/api/v1/apps/billing/jobs/long/trigger")
        await wait_until(lambda: started, 10, "the first run")
        reason = await api.error("POST", "/api/v1/apps/billing/jobs/long/trigger", status=409, code="conflict")
        assert "overlap skip" in reason
        forced = await api.ok("POST", "/api/v1/apps/billing/jobs/long/trigger", {"force": True})
        await wait_until(lambda: len(started) == 2, 10, "the forced run, alongside the first")
        # a repeated request with the first's key gets the first's answer, not the policy's refusal
        key = {"Idempotency-Key": "once"}
        keyed = await api.ok("POST", "/api/v1/apps/billing/jobs/long/trigger", {"force": True}, headers=key)
        again = await api.ok("POST", "/api/v1/apps/billing/jobs/long/trigger", {}, headers=key)
        assert again == {"instance_id": keyed["instance_id"], "replayed": True}
        await api.ok("POST", "/api/v1/apps/billing/jobs/long/pause")
        paused_run = await api.ok("POST", "/api/v1/apps/billing/jobs/long/trigger", {"force": True})
        await wait_until(lambda: len(started) == 4, 10, "forced runs of a paused job")
        release.set()
        for fired in (first, forced, keyed, paused_run):
            assert (await final_status(api, fired["instance_id"]))["instance"]["status"] == "succeeded"


# ---- live log tail ------------------------------------------------------------------------------------
async def test_log_tail_streams_lines_as_written_and_ends(servers, db_url):
    server = await start(servers, db_url)
    worker = make_worker(server)
    go = asyncio.Event()

    @worker.handler("chatty")
    async def chatty(ctx):
        for n in range(3):
            await asyncio.wait_for(go.wait(), 10)
            go.clear()
            ctx.log.info("line %d", n)
        return n

    async with aiohttp.ClientSession() as session, worker:
        api = Api(session, server, server.admin_token)
        await api.ok("POST", "/api/v1/apps/billing/jobs", {"name": "chatty", "handler": "chatty"}, status=201)
        fired = await api.ok("POST", "/api/v1/apps/billing/jobs/chatty/trigger")
        url = f"{api.base}/api/v1/instances/{fired['instance_id']}/logs?follow=1"
        events: list[tuple[str, Any]] = []
        async with session.get(url, headers={"Authorization": f"Bearer {api.token}"}) as stream:
            assert stream.status == 200 and stream.content_type == "text/event-stream"
            go.set()
            event = ""
            async for raw in _lines(stream):
                if raw.startswith("event: "):
                    event = raw[7:]
                elif raw.startswith("data: "):
                    events.append((event, json.loads(raw[6:])))
                    if event == "line":
                        go.set()  # the next line is written only after this one arrived: a live tail
                    if event == "end":
                        break
        assert [data["message"] for kind, data in events if kind == "line"] == ["line 0", "line 1", "line 2"]
        assert events[-1] == ("end", {"status": "succeeded"})


async def _lines(stream: aiohttp.ClientResponse) -> Any:
    while True:
        raw = await asyncio.wait_for(stream.content.readline(), 15)
        if not raw:
            return
        yield raw.decode().rstrip("\n")


async def test_mistakes_claim_nothing_and_are_not_server_errors(servers, sqlite_url):
    server = await start(servers, sqlite_url)
    async with aiohttp.ClientSession() as session:
        api = Api(session, server, server.admin_token)
        for method, path in [("POST", "/api/v1/apps/typo/jobs/x/pause"), ("POST", "/api/v1/apps/typo/jobs/x/trigger"),
                             ("DELETE", "/api/v1/apps/typo/jobs/x"), ("PATCH", "/api/v1/apps/typo/jobs/x")]:
            await api.error(method, path, {}, status=404, code="not_found")
        assert (await api.ok("GET", "/api/v1/cluster"))["apps"] == []  # no app was claimed for them
        await api.error("POST", "/api/v1/apps/" + "a" * 129 + "/jobs", {"name": "x"})
        await api.error("GET", "/api/v1/instances/" + "9" * 30, code="invalid")
        await api.error("POST", "/api/v1/instances/-1/kill", code="invalid")
        await api.error("GET", "/api/v1/apps/billing/stats?window=infd", code="invalid")
        huge = base64.urlsafe_b64encode(f"{2**70}:1".encode()).decode()
        await api.error("GET", f"/api/v1/apps/billing/instances?cursor={huge}", code="invalid")
        await api.error("POST", "/api/v1/apps/billing/jobs/preview", data=b"[" * 100_000 + b"]" * 100_000,
                        headers={"Content-Type": "application/json"})
        await api.error("POST", "/api/v1/apps/billing/jobs", data=b'{"name": "n", "timeout": Infinity}',
                        headers={"Content-Type": "application/json"})
        await api.error("POST", "/api/v1/tokens", data=b'{"name": "n", "role": "viewer", "expires_in": NaN}',
                        headers={"Content-Type": "application/json"})
        await api.ok("POST", "/api/v1/apps/billing/jobs", {"name": "made"}, status=201)
        audit = await api.ok("GET", "/api/v1/audit")
        assert ("job.create", "made") in {(e["action"], e["target"]) for e in audit["entries"]}
    assert "Traceback" not in server.log_tail(400)
