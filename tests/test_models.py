"""The model in fastjob/models.py is the one place a job's fields, defaults and statuses are defined.

What repeats them in another form (wire schema, API checks, Worker.schedule's arguments, the
stores' columns and positional row codecs) is derived from it, or checked against it here.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sqlite3
from pathlib import Path

import pytest

from fastjob import Worker, jobdef
from fastjob.models import (
    JOB_DEFAULTS,
    JOB_FIELD_TYPES,
    InstanceRow,
    JobRow,
    JobSpec,
    ScheduleType,
    job_wire_fields,
    spec_to_wire,
)
from fastjob.protocol import STRUCTS, ErrorCode
from fastjob.server.api import ApiError, declared_specs, spec_from_wire
from fastjob.store import codecs, create_store

#: Worker.schedule's argument for each JobSpec field it sets directly (the schedule itself is
#: given as interval/delay/cron/at and becomes schedule_type + schedule_expr).
SCHEDULE_ARGS = {
    "handler": "handler", "timezone": "timezone", "params": "params", "timeout": "timeout",
    "retry_times": "retries", "retry_backoff": "retry_backoff", "misfire_policy": "misfire", "tags": "tags",
    "routing": "routing", "run_once": "run_once", "enabled": "enabled", "overlap": "overlap",
    "catch_up_window": "catch_up_window", "max_queued": "max_queued", "alarm": "alarm", "mode": "mode",
    "min_success": "min_success",
}
FULL_SPEC = JobSpec(
    app="a", name="j", handler="h", schedule_type=ScheduleType.CRON, schedule_expr="*/5 * * * * *",
    timezone="Europe/Paris", params={"k": [1, 2]}, timeout=2.5, retry_times=3, retry_backoff=0.5,
    misfire_policy="fire_all", tags=["gpu"], routing="least_busy", run_once=False, enabled=False,
    overlap="skip", catch_up_window=60.0, max_queued=7, mode="broadcast", min_success=0.5,
)


def _columns(cols: str) -> list[str]:
    return [c.strip().strip("`") for c in cols.split(",")]


def test_the_wire_job_def_is_the_models_fields_plus_the_version_1_boolean() -> None:
    assert STRUCTS["job_def"] == {**job_wire_fields(), "allow_overlap": "bool?"}
    assert set(JOB_FIELD_TYPES) == set(job_wire_fields())


def test_a_spec_goes_over_the_wire_and_through_the_api_checks_unchanged() -> None:
    assert spec_from_wire("a", spec_to_wire(FULL_SPEC)) == FULL_SPEC


@pytest.mark.parametrize("field", sorted(set(JOB_FIELD_TYPES) - {"params", "alarm"}))  # maps, both
def test_the_api_refuses_each_field_with_a_wrong_type(field: str) -> None:
    body = spec_to_wire(FULL_SPEC)
    body[field] = {"not": "this"}
    with pytest.raises(ApiError, match=field):
        spec_from_wire("a", body)


def test_worker_schedule_sets_every_declared_field_with_the_models_defaults() -> None:
    declared = {f.name for f in dataclasses.fields(JobSpec)} - {"app", "name", "schedule_type", "schedule_expr"}
    assert set(SCHEDULE_ARGS) == declared
    params = inspect.signature(Worker.schedule).parameters
    for field, arg in SCHEDULE_ARGS.items():
        default = params[arg].default
        if default not in (None, ()):  # None and (): the model's default is filled in by schedule()
            assert default == getattr(JOB_DEFAULTS, field), field
    worker = Worker(app="a", servers=["127.0.0.1:1"])
    worker.handler("h")(lambda ctx: None)
    spec = worker.schedule("j", handler="h", cron="*/5 * * * * *")
    assert dataclasses.replace(spec, schedule_type=ScheduleType.API, schedule_expr="", name="", app="",
                               handler="") == JOB_DEFAULTS


def test_row_codecs_read_the_columns_in_the_models_order() -> None:
    """The codecs build rows by position (the claim's hot path): the column lists must follow the model."""
    assert _columns(codecs.JOB_COLS) == [f.name for f in dataclasses.fields(JobRow)]
    inst = ["trigger" if c == "trigger_kind" else c for c in _columns(codecs.INST_COLS)]
    assert inst == [f.name for f in dataclasses.fields(InstanceRow)]
    spec_fields = {f.name for f in dataclasses.fields(JobSpec)}
    assert {c.strip("`") for c in codecs.SPEC_COLS} - spec_fields == {"allow_overlap", "interval"}
    assert spec_fields - {c.strip("`") for c in codecs.SPEC_COLS} == {"app", "name"}  # the key, not updated


async def test_the_stored_tables_have_a_column_for_every_field(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    store = create_store(f"sqlite:///{path}")
    await store.open()
    await store.close()
    with sqlite3.connect(path) as conn:
        jobs = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
        instances = {r[1] for r in conn.execute("PRAGMA table_info(instances)")}
    assert {f.name for f in dataclasses.fields(JobRow)} <= jobs
    assert {f.name for f in dataclasses.fields(InstanceRow)} - {"trigger"} <= instances


def test_a_spec_goes_through_the_admin_apis_json_fields_unchanged() -> None:
    """jobdef's keywords (the admin API, the CLI, the console) carry every declared field there and back."""
    assert jobdef.spec_from_json("a", jobdef.job_fields(FULL_SPEC)) == FULL_SPEC


@pytest.mark.parametrize(("fields", "error"), [
    ({"mode": "everywhere"}, "mode must be one of single, broadcast, got 'everywhere'"),
    ({"min_success": 0}, "min_success must be a fraction above 0 and at most 1, got 0"),
    ({"min_success": 1.5}, "min_success must be a fraction above 0 and at most 1, got 1.5"),
    ({"min_success": float("nan")}, "min_success must be a fraction above 0 and at most 1, got nan"),
])
def test_the_wire_api_refuses_a_bad_mode_or_min_success_naming_the_job(fields: dict, error: str) -> None:
    with pytest.raises(ApiError, match=re.escape(f"job 'j': {error}")) as refused:
        declared_specs("a", [{**spec_to_wire(FULL_SPEC), **fields}])
    assert refused.value.code == ErrorCode.INVALID
