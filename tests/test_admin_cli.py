"""The ``fastjob`` CLI and :class:`fastjob.Client` against a real fastjob-server process: the CLI runs
as a subprocess (its exit codes and one-line errors are part of its contract), the Client in the
test process, with a real worker where an instance must run."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import FAST_CLUSTER_ARGS

from fastjob import ApiError, Client, Worker
from fastjob.testing import ServerProcess

pytestmark = pytest.mark.slow

REGULAR = [*FAST_CLUSTER_ARGS, "--second-level-threshold", "0"]
APP = "shop"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self
        return json.loads(self.out)


async def fastjob(server: ServerProcess | None, *argv: str, token: str | None = None, url: str | None = None,
                  timeout: float = 20.0) -> Run:
    """``python -m fastjob.cli ARGV`` with FASTJOB_URL/FASTJOB_TOKEN naming ``server`` (and its admin token)."""
    env = dict(os.environ)
    env["FASTJOB_URL"] = url or (f"http://{server.http_address}" if server else "http://127.0.0.1:1")
    env["FASTJOB_TOKEN"] = token or (server.admin_token if server and server.admin_token else "")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "fastjob.cli", *argv, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def one_line_error(run: Run, code: int, starts: str) -> str:
    """The run failed with ``code`` and a single ``fastjob: ...`` line on stderr, no traceback."""
    assert run.code == code, run
    assert run.err.endswith("\n") and run.err.count("\n") == 1, run
    assert run.err.startswith(starts) and "Traceback" not in run.err, run
    return run.err


async def start(servers: Any, db: str) -> ServerProcess:
    server = await servers.start(db, *REGULAR)
    assert server.http_address and server.admin_token
    return server


def client(server: ServerProcess) -> Client:
    return Client(f"http://{server.http_address}", server.admin_token, timeout=15.0)


# ---- the CLI -----------------------------------------------------------------------------------------
async def test_cli_manages_jobs_instances_and_tokens(servers, sqlite_url, tmp_path: Path):
    server = await start(servers, sqlite_url)

    shown = await fastjob(server, "cluster")
    assert shown.code == 0 and server.address in shown.out and "SERVER" in shown.out, shown
    assert [s["id"] for s in (await fastjob(server, "--json", "cluster")).json()["servers"]] == [server.address]

    # a bad cron: the API's refusal, in one line; bad JSON: a usage error
    one_line_error(await fastjob(server, "jobs", "create", APP, "report", "--cron", "not a cron"), 1,
                   "fastjob: invalid: job 'report': bad cron expression")
    one_line_error(await fastjob(server, "jobs", "create", APP, "report", "--params", "{bad"), 2,
                   "fastjob: --params is not JSON")

    created = await fastjob(server, "jobs", "create", APP, "report", "--cron", "0 0 1 1 *", "--retries", "2",
                            "--params", '{"day": 1}', "--tags", "a,b", "--timeout", "30")
    assert created.code == 0 and "cron 0 0 1 1 *" in created.out and "a,b" in created.out, created
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"name": "nightly", "cron": "0 3 * * *", "handler": "h"}))
    from_file = (await fastjob(server, "jobs", "create", APP, "--file", str(job_file), "--interval", "600",
                               "--json")).json()["job"]
    assert (from_file["name"], from_file["interval"], from_file["handler"]) == ("nightly", 600.0, "h")
    assert "cron" not in from_file  # a schedule given as an option replaces the file's

    show = await fastjob(server, "jobs", "show", APP, "report", "--next", "3")
    assert show.code == 0, show
    fires = [dt.datetime.fromisoformat(line.strip()).timestamp()
             for line in show.out.split("next fires:\n")[1].splitlines()]  # local ISO 8601, to the second
    assert fires == (await fastjob(server, "--json", "jobs", "show", APP, "report", "--next", "3")).json()["next_fires"]
    assert len(fires) == 3 and all(dt.datetime.fromtimestamp(t, dt.timezone.utc).month == 1 for t in fires)

    listed = await fastjob(server, "jobs", "list", APP)
    rows = listed.out.splitlines()
    assert rows[0].split()[:2] == ["NAME", "SCHEDULE"] and [r.split()[0] for r in rows[1:]] == ["nightly", "report"]
    tagged = (await fastjob(server, "jobs", "list", APP, "--tag", "a", "--json")).json()
    assert [job["name"] for job in tagged["jobs"]] == ["report"]
    assert "(none)" in (await fastjob(server, "jobs", "list", APP, "--name", "zzz")).out

    edited = (await fastjob(server, "jobs", "edit", APP, "report", "--interval", "3600", "--retries", "5",
                            "--json")).json()["job"]
    assert (edited["interval"], edited["retries"], edited["params"], edited["timeout"]) == (3600.0, 5, {"day": 1}, 30)
    assert "cron" not in edited
    one_line_error(await fastjob(server, "jobs", "edit", APP, "report"), 2, "fastjob: jobs edit: nothing to change")

    paused = (await fastjob(server, "jobs", "pause", APP, "report", "--json")).json()["job"]
    assert (paused["enabled"], paused["paused_by"]) == (False, "operator")
    assert "no (paused by operator)" in (await fastjob(server, "jobs", "show", APP, "report")).out
    assert (await fastjob(server, "jobs", "resume", APP, "report", "--json")).json()["job"]["enabled"] is True

    triggered = await fastjob(server, "jobs", "trigger", APP, "nightly", "--params", '{"run": 1}')
    assert triggered.code == 0 and triggered.out.strip().isdigit(), triggered
    instance_id = int(triggered.out)
    listed_instances = (await fastjob(server, "instances", "list", APP, "--job", "nightly", "--json")).json()
    assert instance_id in [row["id"] for row in listed_instances["instances"]]
    table = await fastjob(server, "instances", "list", APP, "--limit", "50")
    assert table.code == 0 and table.out.split()[:4] == ["ID", "JOB", "ATTEMPT", "STATUS"], table
    detail = await fastjob(server, "instances", "show", str(instance_id))
    assert detail.code == 0, detail
    pairs = dict(line.split(None, 1) for line in detail.out.split("\n\n")[0].splitlines())
    assert (pairs["id"], pairs["job"]) == (str(instance_id), "nightly") and pairs["status"] in ("waiting", "queued")
    shown_instance = (await fastjob(server, "--json", "instances", "show", str(instance_id))).json()
    assert shown_instance["instance"]["params"] == {"run": 1} and shown_instance["instance"]["trigger"] == "api"
    assert (await fastjob(server, "logs", str(instance_id))).code == 0
    # no worker: it never started, so a kill cancels it
    assert (await fastjob(server, "instances", "kill", str(instance_id))).out.strip() == f"{instance_id}: cancelled"
    one_line_error(await fastjob(server, "instances", "show", "999999"), 1, "fastjob: not_found: no instance 999999")
    assert "(none)" in (await fastjob(server, "workers", APP)).out

    # a viewer token reads but may not change anything; revoked, it may not even read
    new_token = await fastjob(server, "token", "create", "--name", "ci-viewer", "--role", "viewer")
    assert new_token.code == 0, new_token
    secret = new_token.out.splitlines()[-1]
    assert secret.startswith("fj_") and " " not in secret
    tokens = (await fastjob(server, "token", "list", "--json")).json()["tokens"]
    viewer = next(t for t in tokens if t["name"] == "ci-viewer")
    assert viewer["role"] == "viewer" and "ci-viewer" in (await fastjob(server, "token", "list")).out
    assert (await fastjob(server, "jobs", "list", APP, token=secret)).code == 0
    one_line_error(await fastjob(server, "jobs", "pause", APP, "report", token=secret), 1, "fastjob: forbidden: ")
    assert (await fastjob(server, "token", "revoke", viewer["id"])).code == 0
    one_line_error(await fastjob(server, "jobs", "list", APP, token=secret), 1, "fastjob: unauthorized: ")

    assert (await fastjob(server, "jobs", "delete", APP, "report")).code == 0
    one_line_error(await fastjob(server, "jobs", "show", APP, "report"), 1, "fastjob: not_found: ")


async def test_cli_usage_and_unreachable_server_exit_codes():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = await fastjob(None, "cluster", url=f"http://127.0.0.1:{port}")
    one_line_error(down, 3, "fastjob: unreachable: ")
    assert (await fastjob(None, "--json", "jobs", "list", APP, url=f"http://127.0.0.1:{port}")).code == 3
    usage = await fastjob(None, "instances", "show", "not-a-number")
    assert usage.code == 2 and "Traceback" not in usage.err, usage
    assert (await fastjob(None)).code == 2


# ---- the Client ---------------------------------------------------------------------------------------------
async def test_follow_logs_streams_a_running_instance_until_it_ends(servers, sqlite_url):
    server = await start(servers, sqlite_url)
    worker = Worker(app=APP, servers=[server.address], reconnect_max=0.5)

    @worker.handler("chatty")
    async def chatty(ctx):
        for n in range(3):
            await asyncio.sleep(0.3)
            ctx.log.info("line %d", n)
        return n

    async with worker, client(server) as api:
        await api.create_job(APP, name="chatty", handler="chatty")
        instance_id = await api.trigger(APP, "chatty")
        cli_tail = asyncio.create_task(fastjob(server, "logs", str(instance_id), "-f"))
        stream = api.follow_logs(instance_id)

        async def follow() -> list[dict[str, Any]]:
            return [line async for line in stream]

        lines = await asyncio.wait_for(follow(), 20)
        assert [line["message"] for line in lines] == ["line 0", "line 1", "line 2"]
        assert all(line["level"] == "INFO" and isinstance(line["ts"], float) for line in lines)
        assert stream.status == "succeeded"
        assert (await api.get_instance(instance_id))["instance"]["status"] == "succeeded"
        tail = await cli_tail
        assert tail.code == 0, tail
        assert [row.split(" ", 2)[1:] for row in tail.out.splitlines()] == [
            ["INFO", "line 0"], ["INFO", "line 1"], ["INFO", "line 2"]]
        assert [line["message"] for line in (await api.logs(instance_id))["lines"]] == ["line 0", "line 1", "line 2"]


async def test_kill_stops_a_running_async_handler(servers, sqlite_url):
    server = await start(servers, sqlite_url)
    worker = Worker(app=APP, servers=[server.address], reconnect_max=0.5)
    running = asyncio.Event()
    never = asyncio.Event()
    cancelled: list[int] = []

    @worker.handler("stuck")
    async def stuck(ctx):
        running.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.append(ctx.instance_id)
            raise

    async with worker, client(server) as api:
        await api.create_job(APP, {"name": "stuck"})
        instance_id = await api.trigger(APP, "stuck")
        await asyncio.wait_for(running.wait(), 10)
        assert (await api.kill(instance_id)) == {"instance_id": instance_id, "status": "killed"}
        assert cancelled == [instance_id]
        assert (await api.get_instance(instance_id))["instance"]["status"] == "killed"
        with pytest.raises(ApiError) as refused:  # nothing left to kill
            await api.kill(instance_id)
        assert refused.value.status == 409 and refused.value.code == "conflict"


async def test_client_errors_carry_the_api_code(servers, sqlite_url):
    server = await start(servers, sqlite_url)
    async with client(server) as api:
        with pytest.raises(ApiError) as missing:
            await api.get_job(APP, "no/such job")
        assert (missing.value.status, missing.value.code) == (404, "not_found")
        assert "no/such job" in missing.value.message
        with pytest.raises(ApiError) as bad:
            await api.preview_job(APP, {"name": "x", "cron": "61 * * * *"})
        assert (bad.value.status, bad.value.code) == (400, "invalid")
    async with Client(f"http://{server.http_address}", "fj_nope_nope") as stranger:
        with pytest.raises(ApiError) as unknown:
            await stranger.cluster()
        assert (unknown.value.status, unknown.value.code) == (401, "unauthorized")
        assert (await stranger.healthz())["status"] == "ok"  # no token needed
