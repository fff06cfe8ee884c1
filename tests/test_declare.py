"""A declaration the server could never take is refused by Worker.schedule at once, naming the job
and the field (issue 14: these used to pass and then loop at registration, or fail opaquely)."""
from __future__ import annotations

import datetime as dt
import re

import pytest

from fastjob import ScheduleError, Worker

pytestmark = pytest.mark.rules


@pytest.fixture
def worker() -> Worker:
    w = Worker(app="a", servers=["127.0.0.1:1"])
    w.handler("h")(lambda ctx: None)
    return w


@pytest.mark.parametrize("kind", [{"interval": 5}, {"delay": 5}, {"at": 2_000_000_000}, {"run_once": True}, {}])
def test_an_unknown_time_zone_is_refused_on_every_schedule_kind(worker: Worker, kind: dict) -> None:
    with pytest.raises(ScheduleError, match="job 'j': unknown timezone 'Mars/Base'"):
        worker.schedule("j", handler="h", timezone="Mars/Base", **kind)


def test_a_cron_that_never_fires_is_refused(worker: Worker) -> None:
    with pytest.raises(ScheduleError, match="job 'j': cron expression .* never fires"):
        worker.schedule("j", handler="h", cron="0 0 30 2 *")


@pytest.mark.parametrize(("at", "expected"), [
    ("2030-01-01T00:00:00", 1893456000.0),  # naive ISO: UTC, as the server reads it
    ("2030-01-01T01:00:00+01:00", 1893456000.0),
    (dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc), 1893456000.0),
    (1893456000, 1893456000.0),
])
def test_at_accepts_an_iso_string_as_the_server_does(worker: Worker, at: object, expected: float) -> None:
    assert float(worker.schedule("j", handler="h", at=at).schedule_expr) == expected


def test_a_bad_at_string_names_the_field(worker: Worker) -> None:
    with pytest.raises(ScheduleError, match="job 'j': at= one-shot time must be epoch seconds or ISO 8601"):
        worker.schedule("j", handler="h", at="next tuesday")


def test_params_that_cannot_be_sent_are_refused_naming_the_job(worker: Worker) -> None:
    with pytest.raises(ValueError, match="job 'j': params cannot be sent to the server"):
        worker.schedule("j", handler="h", interval=5, params=object())
    assert "j" not in worker.declared


def test_a_declaration_larger_than_a_frame_is_refused_naming_the_job(worker: Worker) -> None:
    with pytest.raises(ValueError, match=r"job 'big': its declaration is \d+ bytes encoded, more than the 1048576"):
        worker.schedule("big", handler="h", interval=5, params={"blob": "x" * 2_000_000})


BAD_BAR = "job 'j': min_success must be a fraction above 0 and at most 1, got "


@pytest.mark.parametrize(("fields", "error"), [
    ({"mode": "all"}, "job 'j': mode must be one of single, broadcast, got 'all'"),
    ({"mode": "broadcast", "min_success": 0.0}, BAD_BAR + "0.0"),
    ({"min_success": 2}, BAD_BAR + "2"),
    ({"min_success": True}, BAD_BAR + "True"),
])
def test_a_bad_mode_or_min_success_is_refused_naming_the_job(worker: Worker, fields: dict, error: str) -> None:
    with pytest.raises(ScheduleError, match=re.escape(error)):
        worker.schedule("j", handler="h", interval=5, **fields)
    assert "j" not in worker.declared


def test_a_broadcast_declaration_keeps_its_mode_and_bar(worker: Worker) -> None:
    spec = worker.schedule("j", handler="h", interval=5, mode="broadcast", min_success=0.75)
    assert (spec.mode, spec.min_success) == ("broadcast", 0.75)
    assert worker.declared["j"] is spec
