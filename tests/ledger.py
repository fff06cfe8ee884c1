"""The handlers' own record of what ran, and the fire contract checked against it.

Durability tests must not count runs from the scheduler's rows: a UNIQUE key already keeps
those from repeating, and a lost fire leaves no row to miss. Instead each test handler appends
one line per start and one per end to a ledger file (``O_APPEND`` writes of one short line are
atomic, so several worker processes can share one file), and the checks below compare the
ledger with the fires the schedule planned.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

FINAL = {"succeeded", "failed", "timed_out", "interrupted", "killed", "skipped", "cancelled"}


@dataclass(frozen=True)
class Run:
    """One handler run as the handler itself saw it."""

    job: str
    planned_ms: int
    attempt: int
    instance_id: int
    worker: str
    start: float
    end: float | None  # None: the run never finished (its worker died or it is still going)


class Ledger:
    """An append-only file of handler starts and ends, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self._runs: list[Run] = []
        # (instance id, worker) -> indexes of its runs not ended yet, oldest first: a worker may run
        # one instance twice, and second-level runs all have instance id 0
        self._open: dict[tuple[int, str], collections.deque[int]] = collections.defaultdict(collections.deque)

    def _write(self, record: dict[str, Any]) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
        finally:
            os.close(fd)

    def started(self, ctx: Any, worker: str) -> float:
        now = time.time()
        self._write({"e": "start", "job": ctx.job, "planned_ms": int(round(ctx.scheduled_at * 1000)),
                     "attempt": ctx.attempt, "id": ctx.instance_id, "w": worker, "t": now})
        return now

    def ended(self, ctx: Any, worker: str) -> None:
        self._write({"e": "end", "id": ctx.instance_id, "w": worker, "t": time.time()})

    def handler(self, worker: str, hold: float = 0.0) -> Callable[[Any], Any]:
        """An async handler that records its run (and holds it for ``hold`` seconds)."""
        import asyncio

        async def run(ctx: Any) -> str:
            self.started(ctx, worker)
            try:
                if hold:
                    await asyncio.sleep(hold)
            finally:  # an interrupted run ends too: when it stopped is what overlap checks need
                self.ended(ctx, worker)
            return "ok"

        return run

    def runs(self, job: str | None = None) -> list[Run]:
        """Every run recorded so far (of one job, if named), in start order."""
        self._read_new()
        return [r for r in self._runs if job is None or r.job == job]

    def _read_new(self) -> None:
        """Read what was appended since the last call; a line still being written waits."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            record = json.loads(line)
            key = (record["id"], record["w"])
            if record["e"] == "start":
                self._runs.append(Run(record["job"], record["planned_ms"], record["attempt"], record["id"],
                                      record["w"], record["t"], None))
                self._open[key].append(len(self._runs) - 1)
            elif self._open.get(key):
                index = self._open[key].popleft()
                self._runs[index] = dataclasses.replace(self._runs[index], end=record["t"])


def per_second(first_ms: int, last_ms: int) -> list[int]:
    """The planned times of a ``* * * * * *`` cron from ``first_ms`` to ``last_ms`` (whole seconds)."""
    start = -(-first_ms // 1000) * 1000
    return list(range(start, last_ms + 1, 1000))


def runs_by_planned(runs: Iterable[Run]) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = collections.defaultdict(list)
    for run in runs:
        out[run.planned_ms].append(run)
    return out


def last_attempts(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The row of each fire's last attempt, by planned time (rows of one job)."""
    last: dict[int, dict[str, Any]] = {}
    for row in rows:
        current = last.get(row["planned_ms"])
        if current is None or row["attempt"] > current["attempt"]:
            last[row["planned_ms"]] = row
    return last


def assert_each_ran_once(runs: Sequence[Run], planned: Sequence[int], *, reruns_allowed: bool = False) -> None:
    """Every planned fire ran, and none ran twice (a re-run after an interruption is a second run
    only when ``reruns_allowed``: the contract allows it after a worker's death)."""
    by_planned = runs_by_planned(runs)
    missing = [t for t in planned if t not in by_planned]
    assert not missing, f"{len(missing)} of {len(planned)} planned fires never ran: {missing[:10]}"
    twice = {t: [(r.attempt, r.worker) for r in by_planned[t]] for t in planned if len(by_planned[t]) > 1}
    if reruns_allowed:
        # a second run must be a new attempt that started after the previous run surely ended
        twice = {t: seq for t, seq in twice.items() if len({a for a, _ in seq}) != len(seq)}
    assert not twice, f"fires ran more than once: {dict(list(twice.items())[:10])}"


def assert_final_records(rows: Sequence[dict[str, Any]], planned: Sequence[int],
                         want: Callable[[int], set[str]] = lambda t: {"succeeded"}) -> dict[int, dict[str, Any]]:
    """Every planned fire has exactly one last attempt, final and in the status its policy allows."""
    last = last_attempts(rows)
    missing = [t for t in planned if t not in last]
    assert not missing, f"{len(missing)} planned fires have no record: {missing[:10]}"
    wrong = {t: (last[t]["status"], last[t]["error"]) for t in planned if last[t]["status"] not in want(t)}
    assert not wrong, f"fires with the wrong final record: {dict(list(wrong.items())[:10])}"
    return last


def assert_no_overlap(runs: Sequence[Run]) -> None:
    """No two runs of a job were going on at the same time (overlap queue/skip/buffer_one)."""
    spans = sorted((r.start, r.end if r.end is not None else float("inf"), r) for r in runs)
    for (_, e1, r1), (s2, _, r2) in pairwise(spans):
        assert s2 >= e1, f"runs overlapped: {r1} and {r2}"
