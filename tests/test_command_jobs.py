"""The built-in command and container handlers (fastjob/commands.py): real server processes, a real worker,
real programs. No container runtime is installed here, so the container handler is tested for the argv it
builds, the runtime it picks and its refusals, not for a container that runs."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import FAST_CLUSTER_ARGS, wait_until

from fastjob import Worker
from fastjob.commands import (
    COMMAND_HANDLER,
    CONTAINER_HANDLER,
    CommandAllowList,
    CommandError,
    ContainerSpec,
    ImageAllowList,
    builtin_handlers,
    container_argv,
    find_runtime,
    parse_command,
    parse_container,
)
from fastjob.context import JobContext, LocalLog
from fastjob.server.auth import Principal, definition_refusal
from fastjob.testing import ServerProcess

pytestmark = pytest.mark.slow

# every fire through the server's WAL; a heartbeat timeout above the kill grace (2 s), so that the server's
# own safety net (a job's timeout plus a heartbeat timeout) leaves the worker time to end a process group
ARGS = [*FAST_CLUSTER_ARGS, "--second-level-threshold", "0", "--heartbeat-timeout", "6"]
FINAL = {"succeeded", "failed", "timed_out", "interrupted", "killed", "skipped", "cancelled"}
SH = shutil.which("sh") or "/bin/sh"


class Api:
    """The admin API as one token sees it: every answer is (status, JSON)."""

    def __init__(self, session: aiohttp.ClientSession, server: ServerProcess | str, token: str | None) -> None:
        self.session, self.token = session, token
        self.base = server if isinstance(server, str) else f"http://{server.http_address}"

    def as_(self, token: str) -> Api:
        return Api(self.session, self.base, token)

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self.session.request(method, self.base + path, json=body, headers=headers) as answer:
            return answer.status, await answer.json()

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, payload = await self.call(method, path, body)
        assert got == status, (method, path, got, payload)
        return payload

    async def final(self, instance_id: int, timeout: float = 15.0) -> dict[str, Any]:
        async def done() -> Any:
            row = (await self.ok("GET", f"/api/v1/instances/{instance_id}"))["instance"]
            return row if row["status"] in FINAL else None

        return dict(await wait_until(done, timeout, f"instance {instance_id} to end"))

    async def logs(self, instance_id: int) -> list[tuple[str, str]]:
        lines = (await self.ok("GET", f"/api/v1/instances/{instance_id}/logs"))["lines"]
        return [(line["level"], line["message"]) for line in lines]

    async def token_of(self, role: str) -> str:
        return str((await self.ok("POST", "/api/v1/tokens", {"name": f"a {role}", "role": role}, status=201))["token"])


def command_job(name: str, argv: list[str], **fields: Any) -> dict[str, Any]:
    params = {"argv": argv, **fields.pop("params", {})}
    return {"name": name, "handler": COMMAND_HANDLER, "params": params, **fields}


async def run_job(api: Api, job: dict[str, Any], params: Any = None) -> dict[str, Any]:
    """Create the job (as the API's token), trigger it, and return its instance once it ended."""
    await api.ok("POST", "/api/v1/apps/ops/jobs", job, status=201)
    fired = await api.ok("POST", f"/api/v1/apps/ops/jobs/{job['name']}/trigger", {"params": params})
    return await api.final(fired["instance_id"])


def worker_of(server: ServerProcess, **kw: Any) -> Worker:
    return Worker(app="ops", servers=[server.address], reconnect_max=0.5, **kw)


def dead(pid: int) -> bool:
    """Gone, or a zombie (nothing reaps orphans here: PID 1 of this machine does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def context(params: Any, trigger_params: Any = None) -> JobContext:
    return JobContext(7, "job", 1, params, 1, time.time(), LocalLog("job"), trigger_params=trigger_params)


# ---- command jobs, end to end ----------------------------------------------------------------------------
async def test_output_goes_to_the_log_and_the_result(servers, db_url):
    server = await servers.start(db_url, *ARGS)
    async with aiohttp.ClientSession() as session, worker_of(server, allow_commands=["sh"]):
        api = Api(session, server, server.admin_token)
        script = "echo one; echo two >&2; printf 'three, no newline'"
        row = await run_job(api, command_job("out", [SH, "-c", script]))
        assert row["status"] == "succeeded", row
        assert row["result"] == {"exit_code": 0, "output_tail": "one\nthree, no newline"}
        assert await api.logs(row["id"]) == [("INFO", "one"), ("WARNING", "two"), ("INFO", "three, no newline")]


async def test_a_long_line_is_cut_and_the_tail_is_bounded(servers, sqlite_url):
    server = await servers.start(sqlite_url, *ARGS)
    async with aiohttp.ClientSession() as session, worker_of(server, allow_commands=["sh"]):
        api = Api(session, server, server.admin_token)
        script = ("head -c 10000 /dev/zero | tr '\\0' x; echo;"
                  " i=0; while [ $i -lt 300 ]; do echo line$i; i=$((i+1)); done")
        row = await run_job(api, command_job("long", [SH, "-c", script]))
        assert row["status"] == "succeeded", row
        logs = await api.logs(row["id"])
        assert logs[0] == ("INFO", "x" * 4000 + " [6000 more bytes cut]") and len(logs) == 301
        tail = row["result"]["output_tail"]
        assert len(tail) <= 4096 and tail.endswith("line298\nline299") and "xxx" not in tail


async def test_non_zero_exit_fails_and_is_retried(servers, db_url):
    server = await servers.start(db_url, *ARGS)
    async with aiohttp.ClientSession() as session, worker_of(server, allow_commands=["sh"]):
        api = Api(session, server, server.admin_token)
        job = command_job("exit3", [SH, "-c", "echo partial; echo boom >&2; exit 3"], retries=1, retry_backoff=0.05)
        first = await run_job(api, job)
        assert first["status"] == "failed" and first["error"] == "CommandFailed: exit code 3: boom", first

        async def both() -> Any:
            rows = (await api.ok("GET", "/api/v1/apps/ops/instances?job=exit3"))["instances"]
            return rows if len(rows) == 2 and all(r["status"] in FINAL for r in rows) else None

        rows = await wait_until(both, 15, "the retry of exit3")
        assert sorted((r["attempt"], r["status"], r["error"]) for r in rows) == [
            (1, "failed", "CommandFailed: exit code 3: boom"), (2, "failed", "CommandFailed: exit code 3: boom")]


@pytest.mark.parametrize("end", ["timeout", "kill"])
async def test_timeout_or_kill_ends_the_process_group(servers, db_url, end):
    """The program ignores SIGTERM and leaves a grandchild (sleep 60, which ignores it too): both are
    gone (SIGKILL after the grace) by the time the run is recorded."""
    server = await servers.start(db_url, *ARGS)
    async with aiohttp.ClientSession() as session, worker_of(server, allow_commands=["sh"]):
        api = Api(session, server, server.admin_token)
        script = "trap '' TERM; sleep 60 & echo $$ $!; wait"
        job = command_job("stuck", [SH, "-c", script], timeout=1.0 if end == "timeout" else None)
        await api.ok("POST", "/api/v1/apps/ops/jobs", job, status=201)
        instance_id = (await api.ok("POST", "/api/v1/apps/ops/jobs/stuck/trigger", {}))["instance_id"]

        async def pids() -> Any:
            lines = await api.logs(instance_id)
            return [int(pid) for pid in lines[0][1].split()] if lines else None

        child, grandchild = await wait_until(pids, 10, "the program's pids")
        assert not dead(child) and not dead(grandchild)
        if end == "kill":
            await api.ok("POST", f"/api/v1/instances/{instance_id}/kill")
        row = await api.final(instance_id)
        assert row["status"] == ("timed_out" if end == "timeout" else "killed"), row
        assert dead(child) and dead(grandchild), "the process group outlived its run"


async def test_what_the_program_leaves_running_is_ended(servers, sqlite_url):
    """The run ends with its main process: a background child still holding the output, or one detached
    from it, is ended with the group (the run does not wait 60 s for it, and leaves no orphan)."""
    server = await servers.start(sqlite_url, *ARGS)
    async with aiohttp.ClientSession() as session, worker_of(server, allow_commands=["sh"]):
        api = Api(session, server, server.admin_token)
        script = "sleep 60 & echo $!; sleep 60 >/dev/null 2>&1 </dev/null & echo $!"
        row = await run_job(api, command_job("bg", [SH, "-c", script], timeout=30))
        assert row["status"] == "succeeded", row
        holding, detached = map(int, row["result"]["output_tail"].split())
        assert dead(holding) and dead(detached)


async def test_trigger_params_are_data_never_the_command(servers, sqlite_url, monkeypatch):
    """An operator's trigger passing its own argv and env changes nothing the job defined: its params reach
    the program as FASTJOB_PARAMS and on stdin only; the worker's own environment stays out."""
    monkeypatch.setenv("FASTJOB_TEST_SECRET", "s3cret")  # the worker's environment (a token, say)
    server = await servers.start(sqlite_url, *ARGS)
    async with aiohttp.ClientSession() as session, worker_of(server, allow_commands=["sh"]):
        admin = Api(session, server, server.admin_token)
        operator = admin.as_(await admin.token_of("operator"))
        script = 'echo "params=$FASTJOB_PARAMS"; echo "stdin=$(cat)"; echo "greeting=$GREETING"; env | cut -d= -f1'
        await admin.ok("POST", "/api/v1/apps/ops/jobs", command_job(
            "show", [SH, "-c", script], params={"env": {"GREETING": "hello"}}), status=201)
        evil = {"argv": ["rm", "-rf", "/"], "env": {"GREETING": "pwned"}, "day": "2026-12-01"}
        fired = await operator.ok("POST", "/api/v1/apps/ops/jobs/show/trigger", {"params": evil})
        row = await admin.final(fired["instance_id"])
        assert row["status"] == "succeeded", row
        lines = [message for _, message in await admin.logs(row["id"])]
        assert json.loads(lines[0].removeprefix("params=")) == evil
        assert json.loads(lines[1].removeprefix("stdin=")) == evil
        assert lines[2] == "greeting=hello"
        names = set(lines[3:])
        assert {"FASTJOB_PARAMS", "FASTJOB_INSTANCE_ID", "FASTJOB_JOB", "FASTJOB_ATTEMPT", "FASTJOB_SCHEDULED_AT",
                "GREETING", "PATH"} <= names
        assert "FASTJOB_TEST_SECRET" not in names and names <= {
            "FASTJOB_PARAMS", "FASTJOB_INSTANCE_ID", "FASTJOB_JOB", "FASTJOB_ATTEMPT", "FASTJOB_SCHEDULED_AT",
            "GREETING", "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME", "PWD",
            "SHLVL", "_"}  # the last three: set by sh itself
        # a job with its own stdin keeps it; a fire with no trigger params passes JSON null
        own = await run_job(admin, command_job("own", [SH, "-c", 'echo "$FASTJOB_PARAMS"; cat'],
                                               params={"stdin": "the job's input"}))
        assert own["result"]["output_tail"] == "null\nthe job's input", own


async def test_a_program_not_allowed_runs_nothing(servers, sqlite_url, tmp_path):
    server = await servers.start(sqlite_url, *ARGS)
    marker = tmp_path / "ran"
    async with aiohttp.ClientSession() as session, worker_of(server, allow_commands=["echo"]):
        api = Api(session, server, server.admin_token)
        row = await run_job(api, command_job("sh", ["sh", "-c", f"touch {marker}"]))
        assert row["status"] == "failed" and not marker.exists()
        assert row["error"] == f"CommandError: program 'sh' ({SH}) is not in this worker's allow_commands", row
        for name, params, error in [
            ("relative", {"argv": ["./echo", "x"]}, "argv[0] './echo' must be a program name or an absolute path"),
            ("no-argv", {"argv": []}, "argv must be a non-empty list of strings"),
            ("typo", {"argv": ["echo"], "envs": {}}, "unknown command param 'envs'; known: argv, env, cwd, stdin"),
            ("env", {"argv": ["echo"], "env": {"A": 1}}, "env['A'] must be a string, got int"),
            ("fastjob-env", {"argv": ["echo"], "env": {"FASTJOB_JOB": "x"}}, "env name 'FASTJOB_JOB' is reserved"),
        ]:
            job = {"name": name, "handler": COMMAND_HANDLER, "params": params}
            row = await run_job(api, job)
            assert (row["status"], row["error"]) == ("failed", f"CommandError: {error}"), row
        ok = await run_job(api, command_job("echo", ["echo", "allowed"]))
        assert ok["status"] == "succeeded" and ok["result"]["output_tail"] == "allowed", ok


def test_allow_lists_compare_resolved_paths(tmp_path):
    echo = shutil.which("echo")
    assert echo is not None
    allowed = CommandAllowList(["echo"])
    assert allowed.check("echo") == allowed.check(echo) == os.path.normpath(echo)
    alias = tmp_path / "alias"  # a symlink to an allowed program is another name: not followed
    alias.symlink_to(echo)
    with pytest.raises(CommandError, match="is not in this worker's allow_commands"):
        allowed.check(str(alias))
    with pytest.raises(ValueError, match="not an executable program"):
        CommandAllowList(["no-such-program-anywhere"])
    with pytest.raises(ValueError, match="must be a program name or an absolute path"):
        CommandAllowList(["bin/echo"])
    with pytest.raises(ValueError, match="must be a list, not a string"):
        CommandAllowList("echo")
    with pytest.raises(CommandError, match="argv has 1025 items"):
        parse_command({"argv": ["echo"] * 1025})
    with pytest.raises(CommandError, match="stdin is more than"):
        parse_command({"argv": ["echo"], "stdin": "x" * (1024 * 1024 + 1)})


async def test_a_worker_without_allow_list_has_no_builtin_handlers(servers, sqlite_url):
    """Without an allow-list a worker registers neither handler (HELLO's handlers do not name them), so a
    command job takes the usual path of a handler nobody has; with one, the handler is there, as async."""
    server = await servers.start(sqlite_url, *ARGS, "--dispatch-wait", "1")
    plain = worker_of(server)
    plain.handler("noop")(noop)
    assert COMMAND_HANDLER not in plain.handlers and CONTAINER_HANDLER not in plain.handlers
    async with aiohttp.ClientSession() as session, plain:
        api = Api(session, server, server.admin_token)
        workers = (await api.ok("GET", "/api/v1/apps/ops/workers"))["workers"]
        assert len(workers) == 1 and "noop" in workers[0]["handlers"]
        assert not {COMMAND_HANDLER, CONTAINER_HANDLER} & set(workers[0]["handlers"]), workers
        row = await run_job(api, command_job("cmd", ["echo", "x"]))
        assert row["status"] == "failed" and "unknown handler 'fastjob:command'" in row["error"], row
    allowed = worker_of(server, allow_commands=["echo"], allow_images=["alpine:*"], container_runtime=SH)
    kinds = allowed.handler_kinds()
    assert (kinds[COMMAND_HANDLER], kinds[CONTAINER_HANDLER]) == ("async", "async")  # a kill stops them
    assert not {COMMAND_HANDLER, CONTAINER_HANDLER} & set(worker_of(server, allow_commands=[]).handlers)


async def noop(ctx: JobContext) -> None:
    return None


# ---- who may define them -----------------------------------------------------------------------------------
async def test_only_admins_create_or_change_command_jobs(servers, sqlite_url):
    server = await servers.start(sqlite_url, *ARGS)
    async with aiohttp.ClientSession() as session:
        admin = Api(session, server, server.admin_token)
        operator = admin.as_(await admin.token_of("operator"))
        job = command_job("du", ["du", "-sh", "/tmp"])
        got, payload = await operator.call("POST", "/api/v1/apps/ops/jobs", job)
        assert got == 403 and payload["error"]["code"] == "forbidden", payload
        await admin.ok("POST", "/api/v1/apps/ops/jobs", job, status=201)
        got, _ = await operator.call("PATCH", "/api/v1/apps/ops/jobs/du", {"params": {"argv": ["rm", "-rf", "/"]}})
        assert got == 403
        changed = await admin.ok("PATCH", "/api/v1/apps/ops/jobs/du", {"params": {"argv": ["du", "-s", "/tmp"]}})
        assert changed["job"]["params"] == {"argv": ["du", "-s", "/tmp"]}


def test_the_admin_rule_is_its_own():
    """The rule does not lean on MANAGE: whatever a role is granted, only an admin defines these jobs."""
    for role in ("viewer", "operator", "worker"):
        refusal = definition_refusal(Principal("someone", role, None), COMMAND_HANDLER)
        assert refusal == (f"only an admin may create or change command and container jobs"
                           f" (handler 'fastjob:command'), not a {role} token")
        assert definition_refusal(Principal("someone", role, None), CONTAINER_HANDLER) is not None
        assert definition_refusal(Principal("someone", role, None), "report") is None
    assert definition_refusal(Principal("root", "admin", frozenset({"ops"})), CONTAINER_HANDLER) is None


# ---- containers: no runtime here, so the argv, the runtime's choice and the refusals -----------------------
def test_container_argv_for_docker_and_podman():
    spec = parse_container({"image": "alpine:3.19", "argv": ["sh", "-c", "echo $A"], "env": {"A": "1"}})
    names = ["A", "FASTJOB_PARAMS", "FASTJOB_JOB"]
    for runtime in ("/usr/bin/docker", "/usr/bin/podman"):
        assert container_argv(runtime, spec, "fastjob-7-1-abcd", names) == [
            runtime, "run", "--rm", "-i", "--name", "fastjob-7-1-abcd",
            "--env", "A", "--env", "FASTJOB_JOB", "--env", "FASTJOB_PARAMS",  # by name: values stay off argv
            "alpine:3.19", "sh", "-c", "echo $A"]
    bare = ContainerSpec("alpine:3.19", [], {})
    assert container_argv("docker", bare, "n", []) == ["docker", "run", "--rm", "-i", "--name", "n", "alpine:3.19"]


def test_the_runtime_is_podman_first_then_docker(tmp_path, monkeypatch):
    for name in ("podman", "docker"):
        program = tmp_path / name
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_runtime(None) == str(tmp_path / "podman")
    assert find_runtime("docker") == str(tmp_path / "docker")
    (tmp_path / "podman").unlink()
    assert find_runtime(None) == str(tmp_path / "docker")
    (tmp_path / "docker").unlink()
    with pytest.raises(ValueError, match="neither podman nor docker is on PATH"):
        builtin_handlers(None, ["alpine:*"])
    with pytest.raises(ValueError, match="container runtime 'nerdctl' not found"):
        find_runtime("nerdctl")


async def test_container_refusals_run_nothing(tmp_path):
    """An image off the list, or params that would smuggle flags or runtime settings, fail at once: the
    runtime (here a program that would leave a mark) is never started."""
    marker = tmp_path / "ran"
    runtime = tmp_path / "docker"
    runtime.write_text(f"#!/bin/sh\ntouch {marker}\n")
    runtime.chmod(0o755)
    container = builtin_handlers(None, ["alpine:*", "registry.example/team/*"], str(runtime))[CONTAINER_HANDLER]
    images = ImageAllowList(["alpine:*", "registry.example/team/*"])
    images.check("alpine:3.19")
    images.check("registry.example/team/tool:1")
    for params, error in [
        ({"image": "ubuntu:24.04"}, "image 'ubuntu:24.04' is not in this worker's allow_images"),
        ({"image": "alpine"}, "image 'alpine' is not in this worker's allow_images"),
        ({"image": "--privileged"}, "image must be an image reference"),
        ({"image": "alpine:3 --privileged"}, "image must be an image reference"),
        ({"image": "alpine:3", "env": {"DOCKER_HOST": "tcp://x"}}, "env name 'DOCKER_HOST' is reserved"),
        ({"image": "alpine:3", "env": {"HOME": "/x"}}, "env name 'HOME' is reserved"),
        ({"image": "alpine:3", "cwd": "/"}, "unknown container param 'cwd'; known: image, argv, env"),
        ({"image": "alpine:3", "argv": "ls"}, "argv must be a list of strings"),
    ]:
        with pytest.raises(CommandError) as caught:
            await container(context(params))
        assert str(caught.value).startswith(error), (params, str(caught.value))
    assert not marker.exists()
