"""The admin API's rules in one process: the route table and its OpenAPI document, the job model
shared with Worker.schedule, tokens and roles, the wire's token rules, and overlap refusals."""
from __future__ import annotations

import re
import time

import pytest

from fastjob import Worker, jobdef
from fastjob.models import InstanceRow, JobRow, Overlap, ScheduleType, Status
from fastjob.schedule import ScheduleError
from fastjob.server.auth import GRANTS, ROLES, Permission, Principal, TokenAuthority, hash_secret, split_token
from fastjob.server.config import ServerConfig
from fastjob.server.http.errors import STATUS
from fastjob.server.http.openapi import build_document
from fastjob.server.http.routes import ROUTES
from fastjob.server.http.service import AdminHttp
from fastjob.server.lines import JobLines, Verdict
from fastjob.store import create_store

pytestmark = pytest.mark.rules


def test_openapi_document_covers_every_route_and_nothing_else():
    class NoBackend:  # building the app reads nothing of its backend
        pass

    app = AdminHttp(NoBackend()).app  # type: ignore[arg-type]
    console = {"/", "/console"}  # the web console's page and files: not the API's
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource.canonical not in console}
    document = build_document()
    documented = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    assert served == documented
    assert len(served) == len(ROUTES)
    for path, ops in document["paths"].items():
        for op in ops.values():
            named = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert named == set(re.findall(r"{(\w+)}", path))
    assert set(document["components"]["schemas"]["Job"]["properties"]) == set(jobdef.FIELD_TYPES)


def test_job_json_is_worker_schedule_keywords_both_ways():
    worker = Worker(app="billing", servers=["127.0.0.1:1"])

    @worker.handler("h")
    def h(ctx):
        pass

    cases = [
        {"cron": "*/5 * * * * *", "retries": 3, "params": {"a": 1}, "tags": ["x"], "timezone": "Europe/Paris"},
        {"interval": 30.0, "overlap": "skip", "max_queued": 5},
        {"delay": 2.5, "timeout": 9.0, "misfire": "skip"},
        {"at": 2_000_000_000.0},
        {"run_once": True, "enabled": False},
        {},
    ]
    for fields in cases:
        from_code = worker.schedule("job", handler="h", **fields)
        from_json = jobdef.spec_from_json("billing", {"name": "job", "handler": "h", **fields})
        assert from_code == from_json
        back = jobdef.job_fields(from_json)
        assert jobdef.spec_from_json("billing", back) == from_json
        for key, value in fields.items():
            assert back[key] == value


@pytest.mark.parametrize("body, message", [
    ({"name": "j", "cron": "* * *"}, "cron"),
    ({"name": "j", "cron": "* * * * *", "delay": 3}, "only one of"),
    ({"name": "j", "retries": True}, "wrong type"),
    ({"name": "j", "tags": ["a", 1]}, "list of strings"),
    ({"name": "j", "nope": 1}, "unknown job field"),
    ({"handler": "h"}, "'name' is required"),
    ({"name": "x" * 191}, "1 to 190"),
    ({"name": "j", "timezone": "Mars/Base"}, "zone"),
    ([], "JSON object"),
    ({"name": "j", "interval": 1e308}, "ten years"),  # its milliseconds would overflow the claim
    ({"name": "j", "delay": float("inf")}, "period"),
    ({"name": "j", "timeout": float("inf")}, "timeout"),
    ({"name": "j", "retry_backoff": float("nan")}, "retry_backoff"),
    ({"name": "j", "at": 1e17}, "one-shot"),
    ({"name": "j", "retries": 2**63}, "retries"),
    ({"name": "j", "max_queued": 2**63}, "max_queued"),
    ({"name": "j", "catch_up_window": 0}, "catch_up_window"),
    ({"name": "j", "alarm": {"on": ["failed", "bogus"]}}, "alarm 'on'"),
    ({"name": "j", "alarm": {"silence": -1}}, "silence"),
    ({"name": "j", "alarm": {"threshold": [3]}}, "threshold"),
    ({"name": "j", "alarm": {"nope": 1}}, "unknown alarm setting"),
    ({"name": "j", "alarm": {"on": [["failed"]]}}, "alarm 'on'"),  # not a 500: a list is no event
    ({"name": "j", "alarm": {"threshold": [2.5, 60]}}, "whole number"),
])
def test_bad_job_json_is_refused_with_one_line(body, message):
    with pytest.raises(ScheduleError) as refused:
        jobdef.spec_from_json("billing", body)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_url_names_the_job():
    with pytest.raises(ScheduleError, match="the URL"):
        jobdef.spec_from_json("billing", {"name": "a"}, name="b")
    assert jobdef.spec_from_json("billing", {}, name="b").name == "b"


def test_roles_grant_what_the_issue_says():
    assert GRANTS["viewer"] == {Permission.READ}
    assert GRANTS["operator"] == {Permission.READ, Permission.TRIGGER, Permission.OPERATE}
    assert GRANTS["admin"] == set(Permission)
    assert GRANTS["worker"] == {Permission.READ, Permission.TRIGGER, Permission.DECLARE}
    assert set(GRANTS) == set(ROLES)
    scoped = Principal("s", "admin", frozenset({"billing"}))
    assert scoped.may(Permission.MANAGE, "billing") and not scoped.may(Permission.MANAGE, "other")
    assert not scoped.may(Permission.MANAGE, None)  # global acts need a global token
    assert set(STATUS) >= {"unauthorized", "forbidden", "too_large", "rate_limited"}


async def test_tokens_verify_only_whole_live_secrets(tmp_path):
    store = create_store("memory://")
    await store.open()
    auth = TokenAuthority(store)
    token, row = await auth.create("ci", "operator", ["billing"], time.time() + 3600)
    assert row.secret_hash == hash_secret(row.salt, split_token(token)[1])  # type: ignore[index]
    assert token.split("_")[-1] not in repr(await store.get_token(row.id))
    who = await auth.verify(token)
    assert who == Principal("ci", "operator", frozenset({"billing"}), row.id)
    for wrong in (token + "x", token[:-1], token.upper(), "fj_" + row.id, "", "Bearer " + token):
        assert await auth.verify(wrong) is None
    expired, _ = await auth.create("old", "viewer", None, time.time() - 1)
    assert await auth.verify(expired) is None
    assert await auth.revoke(row.id) is True
    assert await auth.verify(token) is None  # at once on the server that revoked it


async def test_app_tokens_from_the_command_line_are_worker_tokens():
    store = create_store("memory://")
    await store.open()
    auth = TokenAuthority(store)
    await auth.ensure_app_token("billing", "s3cret")
    assert await auth.app_requires_token("billing") and not await auth.app_requires_token("other")
    who = await auth.verify("s3cret", app="billing")
    assert who is not None and who.role == "worker" and who.may(Permission.DECLARE, "billing")
    assert not who.may(Permission.MANAGE, "billing") and not who.may(Permission.READ, "other")
    assert await auth.verify("s3cret", app="other") is None
    await auth.ensure_app_token("billing", "n3w")  # a changed --app-token replaces the old one
    assert await auth.verify("s3cret", app="billing") is None
    assert await auth.verify("n3w", app="billing") is not None


def test_failed_authentications_are_limited_per_address():
    auth = TokenAuthority(create_store("memory://"))
    for _ in range(19):
        auth.failed("10.0.0.1")
    assert not auth.throttled("10.0.0.1")
    auth.failed("10.0.0.1")
    assert auth.throttled("10.0.0.1") and not auth.throttled("10.0.0.2")


@pytest.mark.parametrize("host, insecure, required", [
    ("127.0.0.1", False, False), ("::1", False, False), ("localhost", False, False),
    ("0.0.0.0", False, True), ("10.1.2.3", False, True), ("10.1.2.3", True, False),
])
def test_a_non_loopback_server_requires_worker_tokens(host, insecure, required):
    assert ServerConfig(host=host, insecure=insecure).tokens_required is required


def _job(overlap: Overlap, max_queued: int = 100) -> JobRow:
    return JobRow(1, "a", "j", "h", ScheduleType.API, "", "UTC", None, None, 0, 1.0, "fire_once", [], "round_robin",
                  False, True, overlap.value, 3600.0, max_queued, None, 0.0, 0.0, None, False, 1)


def _row(instance_id: int, trigger: str = "schedule") -> InstanceRow:
    return InstanceRow(instance_id, 1, "a", instance_id * 1000, 1, Status.WAITING, trigger, None, "s", 1)


@pytest.mark.parametrize("overlap, busy_refuses, queued_refuses", [
    (Overlap.SKIP, True, True), (Overlap.BUFFER_ONE, False, True), (Overlap.QUEUE, False, False),
    (Overlap.ALLOW, False, False),
])
def test_a_trigger_is_refused_where_its_overlap_policy_would_skip_it(overlap, busy_refuses, queued_refuses):
    lines, job = JobLines(), _job(overlap)
    assert lines.refusal(job) is None
    assert lines.admit(job, _row(1), 1)[0] is Verdict.RUN
    assert (lines.refusal(job) is not None) is busy_refuses
    if overlap is not Overlap.SKIP and overlap is not Overlap.ALLOW:
        assert lines.admit(job, _row(2), 1)[0] is Verdict.WAIT
        assert (lines.refusal(job) is not None) is queued_refuses
    forced = lines.admit(job, _row(3, "forced"), 1)
    assert forced[0] is Verdict.RUN  # force runs it at once, alongside


def test_a_queued_fire_can_be_taken_out_of_its_line():
    lines, job = JobLines(), _job(Overlap.QUEUE)
    lines.admit(job, _row(1), 1)
    lines.admit(job, _row(2), 1)
    lines.admit(job, _row(3), 1)
    assert lines.remove(1, 2) is not None and lines.remove(1, 2) is None
    turn = lines.release(1, 1)
    assert turn is not None and turn.instance_id == 3
