"""The cases of ``python -m bench``: which script runs with which arguments, and how long it may take.

Each case is one subprocess of a script in bench/ (each also runs alone), given ``--json PATH``
for its headline figures. A case lists its arguments for the full run and for ``--quick``
(None: not part of the quick run) and a time budget for each; a case over its budget is killed
with every process it started and reported as failed, and the suite goes on.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Context:
    """What a case's arguments may depend on."""

    quick: bool
    mysql_dsn: str | None  # None: MariaDB is not reachable, its cases are skipped
    samples: Path  # a directory for per-fire samples (the plots read them)


@dataclass(frozen=True)
class Case:
    name: str
    script: str
    what: str  # one line for the progress output and the README
    full: Callable[[Context], list[str]]
    quick: Callable[[Context], list[str]] | None  # None: full run only
    budget: float  # seconds, full run
    quick_budget: float = 60.0
    needs_mysql: bool = False

    def argv(self, ctx: Context) -> list[str] | None:
        """The script's arguments for this run; None if the case is not part of it."""
        if ctx.quick:
            return None if self.quick is None else self.quick(ctx)
        return self.full(ctx)

    def time_budget(self, quick: bool) -> float:
        return self.quick_budget if quick else self.budget


def _burst(jobs: int, lead_time: float, horizon: float, lead: float | None = None) -> Callable[[Context], list[str]]:
    """bench_e2e on SQLite with the floor and APScheduler 3 beside it, samples kept for the plots;
    ``lead``: seconds from seeding to the due instant (bench_e2e's default leaves room for big bursts)."""
    def args(ctx: Context) -> list[str]:
        start = [] if lead is None else ["--lead", f"{lead:g}"]
        return ["--jobs", str(jobs), "--lead-time", f"{lead_time:g}", "--scan-horizon", f"{horizon:g}", *start,
                "--apscheduler", "--samples", str(ctx.samples / f"burst-{jobs}.json")]
    return args


def _cron(jobs: int, window: int, warmup: int, tail: float, loops: str) -> Callable[[Context], list[str]]:
    """cron_load through bench_cron: FastJob on SQLite, APScheduler 3 and the floor for the same N."""
    def args(ctx: Context) -> list[str]:
        return ["--no-micro", "--jobs", str(jobs), "--stores", "sqlite", "--window", str(window), "--warmup",
                str(warmup), "--tail", f"{tail:g}", "--aps-loops", loops,
                "--samples", str(ctx.samples / f"cron-{jobs}.json")]
    return args


def _throughput(store: str, workers: str, jobs: str, window: int, warmup: int) -> Callable[[Context], list[str]]:
    def args(ctx: Context) -> list[str]:
        dsn = ["--mysql-dsn", ctx.mysql_dsn] if ctx.mysql_dsn else []
        return ["--stores", store, "--workers", workers, "--jobs", jobs, "--window", str(window),
                "--warmup", str(warmup), *dsn]
    return args


def _fixed(*argv: str) -> Callable[[Context], list[str]]:
    return lambda ctx: list(argv)


CASES: list[Case] = [
    Case("burst-1k", "bench_e2e.py", "1,000 fires due at one instant: lateness vs the call_at floor and APScheduler 3",
         _burst(1000, 1.0, 5.0), _burst(1000, 1.0, 5.0, lead=5.0), budget=120, quick_budget=45),
    Case("burst-10k", "bench_e2e.py", "10,000 fires due at one instant",
         _burst(10_000, 2.0, 5.0), None, budget=180),
    Case("burst-100k", "bench_e2e.py", "100,000 fires due at one instant",
         _burst(100_000, 5.0, 12.0), None, budget=360),
    Case("cron-2k", "bench_cron.py", "2,000 per-second cron jobs: steady lateness, losses, APScheduler 3 beside",
         _cron(2000, 15, 8, 5.0, "uvloop,asyncio"), _cron(2000, 3, 3, 2.0, "uvloop"), budget=240, quick_budget=60),
    Case("cron-10k", "bench_cron.py", "10,000 per-second cron jobs",
         _cron(10_000, 15, 8, 5.0, "uvloop,asyncio"), None, budget=300),
    Case("throughput-sqlite", "bench_throughput.py",
         "sustained final rows/s on SQLite, 1, 2 and 4 worker processes, offered 10,000 and 60,000 fires/s",
         _throughput("sqlite", "1,2,4", "10000,60000", 8, 6), _throughput("sqlite", "1", "5000", 3, 3),
         budget=420, quick_budget=45),
    Case("throughput-mysql", "bench_throughput.py",
         "sustained final rows/s on MariaDB, 1, 2 and 4 worker processes, offered 10,000 and 40,000 fires/s",
         _throughput("mysql", "1,2,4", "10000,40000", 12, 6), None, budget=480, needs_mysql=True),
    Case("pending", "bench_pending.py", "server RSS and CPU with 1,000,000 fires claimed ahead across 100,000 jobs",
         _fixed(), _fixed("--quick", "--hold", "2"), budget=240, quick_budget=45),
    Case("timewheel", "bench_timewheel.py", "the wheel's cost per op at 1e3 vs 1e6 pending (1e4 with --quick)",
         _fixed("--no-burst"), _fixed("--quick", "--no-burst"), budget=180, quick_budget=30),
    Case("declare-10k", "bench_declare.py", "registering 10,000 declared jobs vs the per-job path",
         _fixed("--jobs", "10000", "--baseline-jobs", "10000"), _fixed("--jobs", "10000", "--baseline-jobs", "2000"),
         budget=120, quick_budget=30),
    Case("declare-100k", "bench_declare.py", "registering 100,000 declared jobs (target <= 5 s)",
         _fixed("--jobs", "100000", "--baseline-jobs", "10000"), None, budget=180),
    Case("protocol", "bench_protocol.py", "frames/s: fastjob Connection vs a uvloop echo that msgpack-decodes/encodes",
         _fixed(), _fixed("--quick"), budget=120, quick_budget=30),
    Case("profile", "bench_profile.py", "py-spy (or cProfile) top 15 of the server during a 10,000-fire burst",
         _fixed("--jobs", "10000"), _fixed("--quick", "--lead", "6"), budget=180, quick_budget=45),
    Case("map", "bench_map.py", "ctx.map of 100,000 items over 2 workers, a 1,000,000-item map_stream's RSS,"
         " a 30-step workflow's step start delay (SQLite)", _fixed(), _fixed("--quick"), budget=180, quick_budget=45),
]


def select(names: str | None) -> list[Case]:
    """The cases named in ``--only`` (comma-separated), in the suite's order; all without it."""
    if not names:
        return list(CASES)
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = wanted - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(sorted(unknown))}; cases: {', '.join(c.name for c in CASES)}")
    return [c for c in CASES if c.name in wanted]
