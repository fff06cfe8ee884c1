"""The claim's fire planner: misfire policies, the budget, and next fire times.

``fastjob.schedule.make_planner`` decides, for one due job, which fires a claim writes as runs,
which missed ones still run (``catch_up``) and which are recorded ``skipped`` with a reason,
and where the job's ``next_trigger_ms`` moves. ``next_fire`` gives the planned time after
another. Pure functions: every expectation below is written out by hand from the rules in
README.md ("misfire=") and protocol.md (``job_def.misfire_policy``), not computed by the code
under test. The jobs are built exactly as the claim builds them (``claim_job`` from the
columns it reads), so the planner sees the placeholders it sees in production.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastjob.models import JobRow
from fastjob.schedule import make_planner, next_fire
from fastjob.store.base import FirePlan
from fastjob.store.codecs import claim_job

pytestmark = pytest.mark.rules  # pytest -m rules: the scheduler's rules, no process, no service

NOW = 1_700_000_000_000  # epoch ms: 2023-11-14 22:13:20 UTC, on a 10 s grid
THRESHOLD = 5_000  # misfire threshold, ms
SECOND = 1_000
BIG_BUDGET = 100_000

COALESCED = "misfire: coalesced into the last missed fire (policy fire_once)"
NOT_RUN = "misfire: not run (policy skip)"


def window_reason(seconds: float) -> str:
    return f"misfire: older than the catch-up window of {seconds:g}s"


def job(kind: str, expr: str = "", next_ms: int | None = None, *, misfire: str = "fire_once",
        catch_up_window: float = 3600.0, run_once: bool = False, tz: str = "UTC", job_id: int = 7) -> JobRow:
    """A JobRow as ``claim_due`` hands it to the planner (CLAIM_COLS order)."""
    return claim_job("app", (job_id, kind, expr, tz, int(run_once), next_ms, 3, misfire, catch_up_window))


def plan(j: JobRow, horizon_ms: int, budget: int = BIG_BUDGET, now: int = NOW) -> FirePlan:
    return make_planner(now, THRESHOLD)(j, horizon_ms, budget)


def every(start: int, stop: int, step: int = SECOND) -> list[int]:
    """start, start + step, ... up to and including stop."""
    return list(range(start, stop + 1, step))


def all_planned(p: FirePlan) -> list[int]:
    return sorted([*p.runs, *p.catch_up, *(t for t, _ in p.skipped)])


# ---- a fixed-rate job 100 s behind, 1 s period: the three policies ---------------------------
# Missed: planned before NOW - THRESHOLD, i.e. NOW-100s ... NOW-6s (95 fires). NOW-5s is within
# the threshold: a normal run, as are NOW-4s ... NOW+2s (the horizon).

BEHIND = NOW - 100 * SECOND
LAST_MISSED = NOW - 6 * SECOND
HORIZON = NOW + 2 * SECOND
ON_TIME = every(NOW - 5 * SECOND, HORIZON)  # 8 fires: within the threshold or in the future


def test_fire_once_runs_the_last_missed_fire_and_skips_the_others_with_a_reason():
    p = plan(job("fixed_rate", "1", BEHIND, misfire="fire_once"), HORIZON)
    assert p.catch_up == [LAST_MISSED]
    assert p.skipped == [(t, COALESCED) for t in every(BEHIND, LAST_MISSED - SECOND)]
    assert len(p.skipped) == 94
    assert p.runs == ON_TIME
    assert p.next_ms == HORIZON + SECOND
    # each planned fire gets exactly one record
    assert all_planned(p) == every(BEHIND, HORIZON)


def test_fire_all_runs_missed_fires_back_to_the_catch_up_window_and_skips_older_ones():
    p = plan(job("fixed_rate", "1", BEHIND, misfire="fire_all", catch_up_window=30), HORIZON)
    window_start = NOW - 30 * SECOND
    assert p.catch_up == every(window_start, LAST_MISSED)  # the window's start itself still runs
    assert p.skipped == [(t, window_reason(30)) for t in every(BEHIND, window_start - SECOND)]
    assert p.runs == ON_TIME
    assert p.next_ms == HORIZON + SECOND
    assert all_planned(p) == every(BEHIND, HORIZON)


def test_fire_all_with_a_window_wider_than_the_backlog_runs_every_missed_fire():
    p = plan(job("fixed_rate", "1", BEHIND, misfire="fire_all", catch_up_window=3600), HORIZON)
    assert p.catch_up == every(BEHIND, LAST_MISSED)
    assert p.skipped == []
    assert p.runs == ON_TIME


def test_skip_records_every_missed_fire_skipped_and_runs_only_the_fires_on_time():
    p = plan(job("fixed_rate", "1", BEHIND, misfire="skip"), HORIZON)
    assert p.catch_up == []
    assert p.skipped == [(t, NOT_RUN) for t in every(BEHIND, LAST_MISSED)]
    assert p.runs == ON_TIME
    assert p.next_ms == HORIZON + SECOND


def test_cron_backlog_follows_the_cron_grid():
    # every 10 s: NOW-60s is on the grid
    p = plan(job("cron", "*/10 * * * * *", NOW - 60 * SECOND, misfire="fire_once"), NOW + 15 * SECOND)
    assert p.skipped == [(t, COALESCED) for t in every(NOW - 60 * SECOND, NOW - 20 * SECOND, 10 * SECOND)]
    assert p.catch_up == [NOW - 10 * SECOND]
    assert p.runs == [NOW, NOW + 10 * SECOND]
    assert p.next_ms == NOW + 20 * SECOND


# ---- the misfire threshold ------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fire_once", "fire_all", "skip"])
def test_fires_within_the_threshold_are_normal_runs(policy):
    start = NOW - THRESHOLD  # exactly at the threshold: not missed
    p = plan(job("fixed_rate", "1", start, misfire=policy), NOW)
    assert p.runs == every(start, NOW)
    assert p.catch_up == [] and p.skipped == []
    assert p.next_ms == NOW + SECOND


@pytest.mark.parametrize("policy, catch_up, skipped", [
    ("fire_once", [NOW - THRESHOLD - 1], []),
    ("fire_all", [NOW - THRESHOLD - 1], []),
    ("skip", [], [(NOW - THRESHOLD - 1, NOT_RUN)]),
])
def test_one_millisecond_past_the_threshold_is_a_misfire(policy, catch_up, skipped):
    start = NOW - THRESHOLD - 1
    p = plan(job("fixed_rate", "1", start, misfire=policy), NOW)
    assert p.catch_up == catch_up and p.skipped == skipped
    assert p.runs == every(start + SECOND, NOW)


# ---- the budget -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy, window", [("fire_once", 3600), ("fire_all", 30), ("skip", 3600)])
@pytest.mark.parametrize("budget", [1, 7, 10, 94, 95, 96])
def test_budget_cuts_the_backlog_and_the_next_call_continues_where_it_stopped(policy, window, budget):
    j = job("fixed_rate", "1", BEHIND, misfire=policy, catch_up_window=window)
    whole = plan(j, HORIZON)
    runs: list[int] = []
    catch_up: list[int] = []
    skipped: list[tuple[int, str]] = []
    cursor: int | None = BEHIND
    calls = 0
    while cursor is not None and cursor <= HORIZON:
        calls += 1
        assert calls < 1000, "the planner does not make progress"
        part = plan(job("fixed_rate", "1", cursor, misfire=policy, catch_up_window=window), HORIZON, budget)
        assert 1 <= len(part) <= budget  # never beyond the budget, never nothing while fires are due
        planned = all_planned(part)
        assert planned[0] == cursor  # continues exactly where the previous call stopped
        assert part.next_ms is not None and part.next_ms > planned[-1]
        runs += part.runs
        catch_up += part.catch_up
        skipped += part.skipped
        cursor = part.next_ms
    # the pieces are the whole: nothing lost, nothing twice, the same decision for every fire
    assert (runs, catch_up, skipped, cursor) == (whole.runs, whole.catch_up, whole.skipped, whole.next_ms)
    assert calls == -(-len(whole) // budget)


def test_a_budget_smaller_than_the_backlog_stops_inside_the_missed_fires():
    p = plan(job("fixed_rate", "1", BEHIND, misfire="fire_once"), HORIZON, budget=10)
    assert p.skipped == [(t, COALESCED) for t in every(BEHIND, BEHIND + 9 * SECOND)]
    assert p.catch_up == [] and p.runs == []
    assert p.next_ms == BEHIND + 10 * SECOND


# ---- fixed delay, one-shot, run-once ----------------------------------------------------------


@pytest.mark.parametrize("policy", ["fire_once", "fire_all", "skip"])
def test_a_fixed_delay_job_is_never_misfired(policy):
    late = NOW - 3_600 * SECOND  # an hour late, older than any catch-up window below
    p = plan(job("fixed_delay", "5", late, misfire=policy, catch_up_window=60), HORIZON)
    assert p.runs == [late]  # one fire, whatever the policy; its next is written when it finishes
    assert p.catch_up == [] and p.skipped == []
    assert p.next_ms is None


@pytest.mark.parametrize("policy, catch_up, skipped", [
    ("fire_once", [NOW - 60 * SECOND], []),
    ("fire_all", [NOW - 60 * SECOND], []),
    ("skip", [], [(NOW - 60 * SECOND, NOT_RUN)]),
])
def test_a_missed_one_shot_follows_its_misfire_policy_once(policy, catch_up, skipped):
    at = NOW - 60 * SECOND
    p = plan(job("once", str(at / 1000), at, misfire=policy), HORIZON)
    assert p.catch_up == catch_up and p.skipped == skipped and p.runs == []
    assert p.next_ms is None  # no second fire


def test_a_missed_one_shot_older_than_the_window_is_skipped_under_fire_all():
    at = NOW - 120 * SECOND
    p = plan(job("once", str(at / 1000), at, misfire="fire_all", catch_up_window=60), HORIZON)
    assert p.skipped == [(at, window_reason(60))]
    assert p.catch_up == [] and p.runs == [] and p.next_ms is None


def test_a_one_shot_in_the_horizon_runs_once_and_one_beyond_it_waits():
    at = NOW + SECOND
    p = plan(job("once", str(at / 1000), at), HORIZON)
    assert (p.runs, p.catch_up, p.skipped, p.next_ms) == ([at], [], [], None)
    later = NOW + 10 * SECOND
    p = plan(job("once", str(later / 1000), later), HORIZON)
    assert (p.runs, p.catch_up, p.skipped, p.next_ms) == ([], [], [], later)  # untouched, not dropped


@pytest.mark.parametrize("kind, expr", [("fixed_rate", "1"), ("cron", "* * * * * *"), ("once", "")])
def test_a_run_once_job_fires_once(kind, expr):
    p = plan(job(kind, expr, NOW, run_once=True), HORIZON)
    assert (p.runs, p.next_ms) == ([NOW], None)
    missed = plan(job(kind, expr, BEHIND, run_once=True, misfire="fire_once"), HORIZON)
    assert (missed.runs, missed.catch_up, missed.skipped, missed.next_ms) == ([], [BEHIND], [], None)


def test_a_job_not_due_within_the_horizon_plans_nothing():
    p = plan(job("fixed_rate", "1", HORIZON + 1), HORIZON)
    assert len(p) == 0 and p.next_ms == HORIZON + 1


# ---- next_fire --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, expr, prev, expected", [
    ("fixed_rate", "2.5", NOW, NOW + 2_500),
    ("fixed_rate", "0.0001", NOW, NOW + 1),  # never less than a millisecond: planned times advance
    ("cron", "*/15 * * * *", NOW, NOW + 2 * 60_000 - 20_000),  # 22:13:20 -> 22:15:00
    ("cron", "0 * * * * *", NOW, NOW + 40_000),  # 22:13:20 -> 22:14:00
    ("cron", "0 * * * * *", NOW + 40_000, NOW + 100_000),  # strictly after a cron time
    ("fixed_delay", "5", NOW, None),  # chained to the previous finish instead
    ("once", str(NOW / 1000), NOW, None),
    ("api", "", NOW, None),
])
def test_next_fire(kind, expr, prev, expected):
    assert next_fire(job(kind, expr, prev), prev) == expected


def test_next_fire_of_a_run_once_job_is_none():
    assert next_fire(job("fixed_rate", "1", NOW, run_once=True), NOW) is None
    assert next_fire(job("cron", "* * * * * *", NOW, run_once=True), NOW) is None


# ---- the schedule must advance ------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, -1], ids=["stuck", "backwards"])
@pytest.mark.parametrize("start", [NOW, BEHIND], ids=["on-time", "missed"])
def test_a_schedule_that_does_not_advance_raises(step, start):
    planner = make_planner(NOW, THRESHOLD, lambda j, t: t + step)
    with pytest.raises(ValueError, match="did not advance"):
        planner(job("fixed_rate", "1", start), HORIZON, BIG_BUDGET)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    offset_s=st.integers(-200, 20),
    period_ms=st.integers(1, 30_000),
    horizon_s=st.integers(0, 10),
    budget=st.integers(1, 300),
    policy=st.sampled_from(["fire_once", "fire_all", "skip"]),
    window_s=st.integers(1, 120),
    kind=st.sampled_from(["fixed_rate", "fixed_delay", "once"]),
)
def test_next_ms_is_always_after_every_planned_fire(offset_s, period_ms, horizon_s, budget, policy, window_s, kind):
    start = NOW + offset_s * SECOND
    expr = str(period_ms / 1000) if kind != "once" else str(start / 1000)
    j = job(kind, expr, start, misfire=policy, catch_up_window=window_s)
    p = plan(j, NOW + horizon_s * SECOND, budget)
    planned = all_planned(p)
    assert len(planned) == len(set(planned)) == len(p) <= budget
    assert p.runs == sorted(p.runs) and p.catch_up == sorted(p.catch_up)
    if planned:
        assert planned[0] == start
        assert p.next_ms is None or p.next_ms > planned[-1]
        # missed fires (catch-up and skipped) all come before the fires that run on time
        missed = [*p.catch_up, *(t for t, _ in p.skipped)]
        assert all(t < NOW - THRESHOLD for t in missed)
        assert all(t >= NOW - THRESHOLD or kind == "fixed_delay" for t in p.runs)
    else:
        assert p.next_ms == start
