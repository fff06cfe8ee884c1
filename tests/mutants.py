"""Mutation check: break each guarantee on purpose and see a test fail.

Each mutant replaces one exact piece of product code with a broken version, in a copy of the
repository, and runs the tests that stand guard over that guarantee. A mutant the tests do not
catch ("survived") is a guarantee nobody checks. Not part of .ci/run (it runs the slow tests
many times); run it after changing a guarantee and put its table in the note:

    python tests/mutants.py               # every mutant
    python tests/mutants.py held-fire ... # some of them
    python tests/mutants.py --list

It needs what the test suite needs (FASTJOB_TEST_MYSQL_DSN for the MariaDB tests).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str
    original: str
    broken: str
    tests: tuple[str, ...]  # pytest node ids or files, run in the copy


MUTANTS = [
    Mutant("recovered-cancelled", "recovered waiting rows are cancelled instead of fired",
           "fastjob/server/recovery.py",
           "            elif row.status in (Status.WAITING, Status.QUEUED):\n"
           "                to_wheel.append(row)",
           "            elif row.status in (Status.WAITING, Status.QUEUED):\n"
           "                self.finish(row, Status.CANCELLED, error=\"mutant\")",
           ("tests/test_failover.py::test_kill_9_of_the_owner_loses_no_fire",
            "tests/test_server_worker.py::test_kill_9_restart_loses_nothing_and_duplicates_nothing")),
    Mutant("reenable-disables", "re-enabling a job disables it", "fastjob/server/api.py",
           '    enabled = bool(body["enabled"])', "    enabled = False",
           ("tests/test_server_worker.py::test_reenabling_a_fixed_delay_job_keeps_one_chain",
            "tests/test_second_level.py::test_job_changes_reach_the_runner_and_jobs_wait_for_a_worker")),
    Mutant("overlap-inverted", "the overlap rule inverted: allow waits, the others run at once",
           "fastjob/server/lines.py",
           "        if job.overlap == _ALLOW or row.trigger == FORCED or not (line.holders or line.waiting):",
           "        if job.overlap != _ALLOW or row.trigger == FORCED or not (line.holders or line.waiting):",
           ("tests/test_server_worker.py::test_overlap_policies",)),
    Mutant("no-fence", "the fence on the epoch removed: a deposed owner still writes",
           "fastjob/store/sql.py",
           "        if r.rowcount != 1:\n            raise NotOwnerError(app, epoch)", "        pass",
           ("tests/test_store.py::test_stale_owner_is_fenced",
            "tests/test_failover.py::test_frozen_owner_wakes_fenced")),
    Mutant("writer-drops-batch", "the status writer drops a batch the database refused",
           "fastjob/server/writer.py",
           "            self._updates[:0] = updates\n            self._logs[:0] = lines",
           "            pass",
           ("tests/test_rules.py",)),
    Mutant("held-fire-at-once", "a fire the dead owner may have sent is fired at once, not held",
           "fastjob/server/recovery.py",
           "and row.epoch < epoch and row.planned_ms <= cutoff_ms:",
           "and row.epoch < epoch and row.planned_ms <= cutoff_ms and False:",
           ("tests/test_failover.py::test_a_fire_sent_just_before_the_owner_died_goes_back_to_its_worker",)),
    Mutant("held-until-deadline", "held fires wait for the run lease even when every worker re-attached",
           "fastjob/server/recovery.py",
           "        if rec is not None and rec.expected <= rec.reattached:",
           "        if rec is not None and False:",
           ("tests/test_failover.py::test_kill_9_of_the_owner_loses_no_fire",
            "tests/test_failover.py::test_a_fire_sent_just_before_the_owner_died_goes_back_to_its_worker",
            "tests/test_scheduler_rules.py::test_a_failover_holds_what_the_previous_owner_may_have_sent_until_its_workers_are_back")),
    Mutant("misfire-ignored", "fires never written run anyway, whatever the misfire policy",
           "fastjob/schedule.py",
           "        if t is not None and t < missed_before and job.schedule_type is not ScheduleType.FIXED_DELAY:",
           "        if False:",
           ("tests/test_failover.py::test_downtime_misfires_follow_each_policy", "tests/test_planner.py")),
    Mutant("no-run-lease", "a worker that lost its server keeps running its instances",
           "fastjob/worker_runs.py",
           "                    self.interrupt(reason)\n                self.lease_lapsed(reason)",
           "                    pass\n                self.lease_lapsed(reason)",
           ("tests/test_failover.py::test_a_slow_reattach_never_runs_an_instance_twice_at_once",)),
    Mutant("orphan-rerun-at-once", "a lost worker's instance runs again at once, not after its run lease",
           "fastjob/server/recovery.py",
           "        safe_in = session.last_received + self.run_lease + self.lease_margin - now",
           "        safe_in = 0.0",
           ("tests/test_failover.py::test_kill_9_of_a_worker_mid_run_runs_it_again_elsewhere",
            "tests/test_scheduler_rules.py::test_a_worker_that_left_gets_its_run_lease_before_its_instance_runs_elsewhere")),
    Mutant("interrupted-not-rerun", "an interrupted run is not run again",
           "fastjob/server/follow_ups.py",
           "    if status is Status.INTERRUPTED and row.reruns < MAX_RERUNS:",
           "    if False:",
           ("tests/test_failover.py::test_a_stopping_worker_hands_its_run_back",
            "tests/test_scheduler_rules.py::test_a_worker_that_left_gets_its_run_lease_before_its_instance_runs_elsewhere")),
    Mutant("judge-at-once", "peers are judged dead right after a database outage",
           "fastjob/server/cluster.py",
           "        return self.clock.monotonic() - self._db_up_since > 2 * self.interval + RENEW_SLACK",
           "        return True",
           ("tests/test_failover.py::test_database_outage_moves_no_app",)),
    Mutant("no-hand-over", "a stopping server releases its apps instead of handing them over cleanly",
           "fastjob/server/cluster.py",
           "            await self.hand_over(app, self._successor(live), \"server stopping\")",
           "            await self.hand_over(app, None, \"server stopping\")",
           ("tests/test_handover.py", "tests/test_failover.py::test_sigterm_hands_the_app_over_cleanly")),
    Mutant("up-since-sent", "database contact counted from a retried call's sending, not its answer",
           "fastjob/server/cluster.py",
           "            self._db_up_since = self.clock.monotonic()\n        await self.sync()",
           "            self._db_up_since = sent_at\n        await self.sync()",
           ("tests/test_judging.py",)),
    Mutant("unanswered-forgotten", "fires of a claim whose answer was lost are never wheeled",
           "fastjob/server/scan.py",
           "        await self._recover_unanswered(app, epoch)\n", "",
           ("tests/test_unanswered.py",)),
    Mutant("vanished-unregistered", "a worker that vanished is taken off the registry at once",
           "fastjob/server/app.py",
           "            clean = session.draining and session.run_count == 0\n",
           "            clean = True\n",
           ("tests/test_registry.py",)),
    Mutant("frozen-sessions-kept", "a survivor leaves a dead owner's database sessions open",
           "fastjob/server/cluster.py",
           "            await self._fence(row.owner, servers.get(row.owner))", "            pass",
           ("tests/test_fencing.py::test_the_survivor_ends_a_frozen_owners_sessions_and_takes_its_app",)),
    Mutant("stale-lease-fires", "a fire due while the lease is stale is dropped instead of held",
           "fastjob/server/scheduler.py",
           "            self.held.append((row, epoch))\n", "",
           ("tests/test_scheduler_rules.py::test_a_fire_due_while_the_lease_is_stale_is_held_until_it_is_renewed",)),
    Mutant("retry-at-once", "a failed attempt is retried at once, not after its backoff",
           "fastjob/server/follow_ups.py",
           "        wait = 0.0 if rerun else schedule.retry_delay(job, row.attempt - row.reruns)",
           "        wait = 0.0",
           ("tests/test_scheduler_rules.py::test_a_failed_attempt_is_retried_after_its_backoff_until_the_retries_are_used",)),
    Mutant("lease-outlives-timeout", "a server's lease outlives its heartbeat timeout: a frozen owner still sends when "
           "its app is taken", "fastjob/server/cluster.py",
           "        self._lease_until = sent_at + self.timeout - min(self.interval, self.timeout / 4)",
           "        self._lease_until = sent_at + 2 * self.timeout",
           ("tests/test_cluster_rules.py",)),
    Mutant("sl-runner-repeats", "a new runner of a worker-run job fires the grid point its predecessor just ran",
           "fastjob/second_level_runner.py",
           "    return max(next_on_grid(origin, period, now, strictly=False),\n"
           "               next_on_grid(origin, period, last_run_at, strictly=True))",
           "    return next_on_grid(origin, period, last_run_at, strictly=False)",
           ("tests/test_second_level_rules.py",
            "tests/test_second_level.py::test_kill_9_worker_hands_job_to_the_other")),
    Mutant("sl-handed-forgotten", "a job handed to a worker before is handed to the next as never run (it runs twice)",
           "fastjob/server/second_level.py",
           "        if self._handed_at.get(job.id, -math.inf) < anchor:",
           "        if False:",
           ("tests/test_second_level_rules.py",
            "tests/test_second_level.py::test_kill_9_worker_hands_job_to_the_other")),
    Mutant("operator-pause-resumed", "a worker's re-declaration resumes a job an operator paused",
           "fastjob/store/job_writes.py",
           "        operator_paused = not was_enabled and paused_by in (None, PausedBy.OPERATOR.value)",
           "        operator_paused = False",
           ("tests/test_store.py", "tests/test_reconcile.py")),
    Mutant("one-shot-refired", "re-declaring a one-shot that fired plans it again", "fastjob/store/job_writes.py",
           "    resumed = enabled and not was_enabled and (origin is Origin.API or not one_shot)",
           "    resumed = enabled and not was_enabled",
           ("tests/test_store.py",)),
    Mutant("undeclared-never-paused", "a job no live worker declares keeps firing", "fastjob/server/reconcile.py",
           "        due = sorted(name for name, first in since.items() if now - first >= self.grace)",
           "        due: list[str] = []",
           ("tests/test_reconcile_rules.py", "tests/test_reconcile.py")),
    # issue 15: the admin API
    Mutant("action-applied-off-owner", "a server applies an action on an app another server owns, not forwarding it",
           "fastjob/server/http/service.py",
           "                    return await service.forward(request, owner)", "                    pass",
           ("tests/test_admin_api.py::test_actions_are_forwarded_to_the_owner[sqlite]",)),
    Mutant("killed-run-rerun", "an operator's kill is recorded interrupted, and the run runs again",
           "fastjob/server/dispatch.py",
           "        if flight.kill_requested and status is not Status.SUCCEEDED:", "        if False:",
           ("tests/test_scheduler_rules.py::test_a_killed_run_ends_killed_whatever_its_worker_reports",
            "tests/test_admin_api.py::test_kill_async_process_and_thread_handlers")),
    Mutant("thread-kill-claimed", "a thread handler's kill is answered as done while the thread runs on",
           "fastjob/server/interventions.py",
           "            if not unstarted_lead and (kind not in KILLABLE or flight.session.version < 4):",
           "            if False:",
           ("tests/test_admin_api.py::test_kill_async_process_and_thread_handlers",)),
    Mutant("idempotency-ignored", "a retried trigger with the same Idempotency-Key fires again",
           "fastjob/server/http/views_jobs.py", '    header = call.request.headers.get("Idempotency-Key")',
           "    header = None", ("tests/test_admin_api.py::test_routes_end_to_end[sqlite]",)),
    Mutant("worker-token-deletes", "a worker token may delete jobs over the wire", "fastjob/server/session.py",
           '    "JOB_DELETE": Permission.MANAGE,', '    "JOB_DELETE": Permission.READ,',
           ("tests/test_session.py::test_a_worker_token_declares_and_triggers_but_deletes_nothing",)),
    Mutant("roles-unchecked", "every token may do everything its scope allows", "fastjob/server/auth.py",
           "        if permission not in GRANTS[self.role]:\n            return False", "        pass",
           ("tests/test_admin_rules.py", "tests/test_admin_api.py::test_roles_and_scopes")),
    Mutant("alarm-before-last-retry", "a failure with retries left already alarms", "fastjob/server/scheduler.py",
           "        if status in (Status.FAILED, Status.TIMED_OUT) and last:",
           "        if status in (Status.FAILED, Status.TIMED_OUT):",
           ("tests/test_alarms.py::test_one_alarm_per_failed_instance_across_two_servers[sqlite]",)),
    Mutant("alarm-unsilenced", "a job's silence window is ignored", "fastjob/server/alarms.py",
           "        if now - self._last_alarm.get(key, -1e18) < silence:", "        if False:",
           ("tests/test_alarms.py",)),
    Mutant("prune-unfinished", "retention prunes instances that have not ended (their fires are lost)",
           "fastjob/store/sql_admin.py", " AND planned_ms < ? AND status IN {SQL_FINAL}\"",
           " AND planned_ms < ?\"", ("tests/test_store_admin.py",)),
    Mutant("revoked-token-valid", "a revoked token still authenticates", "fastjob/server/auth.py",
           "    return row.revoked_at is None and (row.expires_at is None or row.expires_at > now)",
           "    return row.expires_at is None or row.expires_at > now",
           ("tests/test_admin_rules.py",)),
    # lead dispatch (issue 18)
    Mutant("lead-overtakes", "a fire goes ahead of an earlier fire of its job that waits for its own time",
           "fastjob/server/scheduler.py",
           "                and not self._earlier_fire_waits(job.id, row) and self.lines.may_go_ahead(job, row)):",
           "                and self.lines.may_go_ahead(job, row)):",
           ("tests/test_lead_dispatch.py::test_a_fire_never_goes_ahead_of_an_earlier_fire_of_its_job",
            "tests/test_server_worker.py::test_overlap_policies")),
    Mutant("lead-ignores-line", "a lead fire goes ahead while its job's line is held",
           "fastjob/server/lines.py",
           "        return (line is None or row.id in line.holders or job.overlap == _ALLOW or row.trigger == FORCED)",
           "        return True",
           ("tests/test_lead_dispatch.py::test_a_lead_fire_waits_for_its_line_and_goes_ahead_when_the_run_before_it_ends",)),
    Mutant("lead-resent-too-late", "a lead fire whose START may be on its way is sent to another worker",
           "fastjob/server/scheduler.py",
           "        if epoch is None or row.planned_ms / 1000.0 - self.clock.wall() <= LEAD_SKEW_MARGIN:",
           "        if epoch is None:",
           ("tests/test_lead_dispatch.py::test_a_lead_fire_whose_start_may_be_on_its_way_waits_for_its_worker",)),
    Mutant("lead-resent-after-our-close", "lead fires of a worker the server cut off go elsewhere at once",
           "fastjob/server/scheduler.py",
           "        if session.closed_by_peer:",
           "        if True:",
           ("tests/test_lead_dispatch.py::test_a_lead_fire_of_a_worker_we_closed_waits_and_is_confirmed_when_it_comes_back",)),
    Mutant("lead-not-withdrawn", "a changed job's lead fire is not withdrawn",
           "fastjob/server/scheduler.py",
           "            self.dispatcher.withdraw_leads(job.id)  # its lead fires carry the old definition",
           "            pass",
           ("tests/test_lead_dispatch.py::test_a_changed_job_withdraws_its_lead_fire_and_fires_as_it_now_says",)),
    Mutant("lead-starts-unconfirmed", "the worker starts a lead fire of a closed connection without the server's word",
           "fastjob/worker_runs.py",
           "            if lead.conn.closed:\n                continue  # listed",
           "            if False:\n                continue  # listed",
           ("tests/test_lead_dispatch.py::test_a_lead_fire_of_a_closed_connection_waits_for_the_servers_word",)),
    Mutant("lead-starts-early", "the worker starts a lead fire as soon as it arrives",
           "fastjob/worker_runs.py",
           "        delay = self._link.clock.surely_after(lead.body[\"start_at\"]) - time.time()",
           "        delay = 0.0",
           ("tests/test_lead_dispatch.py::test_the_worker_holds_a_lead_fire_and_starts_it_at_its_time_on_the_servers_clock",
            "tests/test_lead_dispatch.py::test_a_lead_fire_arrives_early_and_starts_on_time_not_before")),
    Mutant("lead-cutoff-ignored", "a new owner holds back only fires planned up to the old owner's lease end",
           "fastjob/server/recovery.py",
           "    cutoff_ms = min(int(now * 1000), math.ceil(lease_end * 1000)) + math.ceil(lead_time * 1000)",
           "    cutoff_ms = min(int(now * 1000), math.ceil(lease_end * 1000))",
           ("tests/test_lead_dispatch.py::test_a_new_owner_holds_back_fires_up_to_the_lead_time_past_the_old_owners_lease",)),
    Mutant("lease-polled", "a worker notices its lapsed run lease up to a poll late, while its run goes on elsewhere",
           "fastjob/worker_runs.py",
           "            await asyncio.sleep(min(poll, lapses_in + 0.005) if lapses_in > 0 else poll)",
           "            await asyncio.sleep(poll)",
           ("tests/test_worker_failures.py::test_an_instance_whose_worker_is_cut_off_runs_again_only_after_the_first_run_stopped",)),
    Mutant("park-ignored", "a parent waiting for its sub-tasks still holds its slot",
           "fastjob/server/session.py",
           '        (self._parked_tasks if "|" in parent else self._parked_runs).add(parent)', "        pass",
           ("tests/test_subtasks.py::test_nested_maps_on_a_one_slot_worker_finish_because_waiting_parents_are_parked",)),
    Mutant("rerun-reruns-all",
           "a re-run of the fire runs every item of a batch with a failure again, not only the failed",
           "fastjob/server/subtasks.py",
           "            live.only = sorted(int(index) for index, _ in stored.errors or ())\n",
           "            live.only = None\n",
           ("tests/test_subtasks.py::test_a_retried_parent_reuses_the_items_its_earlier_attempt_finished",)),
    Mutant("stored-batch-rerun",
           "a resubmitted batch that succeeded runs again instead of being answered from the store",
           "fastjob/server/subtasks.py",
           "        if stored.status == _SUCCEEDED or (stored.status == _FAILED and attempt <= stored.parent_attempt):",
           "        if stored.status == _FAILED and attempt <= stored.parent_attempt:",
           ("tests/test_subtasks.py::test_a_diamond_workflow_fails_at_its_step_and_reruns_from_there",)),
    Mutant("lost-batch-forgotten", "a batch whose worker left is never sent again",
           "fastjob/server/subtasks.py",
           "                self._hold(live, session.last_received + self.run_lease + self.lease_margin\n"
           "                           - asyncio.get_running_loop().time())",
           "                pass",
           ("tests/test_subtasks.py::test_kill_9_of_a_worker_mid_map_records_every_item_exactly_once",)),
    Mutant("lost-batch-at-once", "a batch whose worker left is sent again at once, not after the run lease",
           "fastjob/server/subtasks.py",
           "        live.timer = asyncio.get_running_loop().call_later(wait, self._lease_out, live)",
           "        live.timer = asyncio.get_running_loop().call_later(0, self._lease_out, live)",
           ("tests/test_subtasks.py::test_a_batch_whose_worker_is_cut_off_runs_elsewhere_only_after_its_run_lease",
            "tests/test_subtasks.py::test_a_workflow_whose_owner_is_killed_mid_run_finishes_each_step_once")),
    Mutant("late-answer-dropped", "a batch's answer that reaches a new owner before its parent resubmits is dropped",
           "fastjob/server/subtasks.py",
           '            self.tasks.spawn(self._record_late(session, body), "fastjob-late-batch")\n            return',
           "            return",
           ("tests/test_subtasks.py::test_a_workflow_whose_owner_is_killed_mid_run_finishes_each_step_once",)),
    Mutant("abandon-ignored", "a parent cut short by its timeout leaves its sub-tasks running",
           "fastjob/server/subtasks.py",
           "            if row.parent == parent or row.parent.startswith(nested):",
           "            if False:",
           ("tests/test_subtasks.py::test_a_workflow_that_times_out_cancels_its_running_step",)),
    Mutant("min-success-ignored", "a broadcast succeeds whatever its sub-runs did",
           "fastjob/fanout.py",
           "    if len(results) - len(failed) < needed - 1e-9:",
           "    if False:",
           ("tests/test_subtasks.py::test_a_broadcast_runs_once_on_every_worker_and_fails_below_min_success",)),
    Mutant("cycle-accepted", "a workflow whose steps form a cycle is accepted",
           "fastjob/fanout.py",
           "            if state.get(upstream) == 1:",
           "            if False:",
           ("tests/test_subtasks.py::test_a_workflow_with_a_cycle_or_an_unknown_step_is_refused_at_declaration",)),
]


def _copy(dest: Path) -> None:
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache",
                                                              "*.db", "*.db-wal", "*.db-shm", "build"))


def run(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    """("killed" | "survived" | "error", seconds, detail)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        copy = Path(tmp) / "repo"
        _copy(copy)
        target = copy / mutant.path
        source = target.read_text()
        if source.count(mutant.original) != 1:
            return "error", 0.0, f"the original code is not in {mutant.path} exactly once: update the mutant"
        broken = source.replace(mutant.original, mutant.broken)
        try:  # a mutant that does not compile would be "killed" by the import error, not by a test
            compile(broken, mutant.path, "exec")
        except SyntaxError as exc:
            return "error", 0.0, f"the broken code does not compile: {exc}"
        target.write_text(broken)
        env = dict(os.environ, PYTHONPATH=str(copy))
        started = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   *mutant.tests], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed", time.monotonic() - started, "the tests hung past the timeout"
        elapsed = time.monotonic() - started
        tail = (proc.stdout.strip().splitlines() or [""])[-1]
        if proc.returncode == 0:
            return "survived", elapsed, tail
        if proc.returncode in (1, 3):  # tests failed / an internal error in a test
            return "killed", elapsed, tail
        return "error", elapsed, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's test run")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if args.list or not chosen:
        for m in MUTANTS:
            print(f"{m.name:24} {m.what}")
        return
    results = []
    for mutant in chosen:
        outcome, seconds, detail = run(mutant, args.timeout)
        results.append((mutant, outcome, seconds, detail))
        print(f"{mutant.name:24} {outcome:9} {seconds:6.1f}s  {detail}", file=sys.stderr, flush=True)
    print("\n| mutant | what it breaks | outcome | seconds | tests |\n|---|---|---|---|---|")
    for mutant, outcome, seconds, _ in results:
        tests = ", ".join(t.split("::")[-1] for t in mutant.tests)
        print(f"| {mutant.name} | {mutant.what} | {outcome} | {seconds:.0f} | {tests} |")
    if any(outcome != "killed" for _, outcome, _, _ in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
