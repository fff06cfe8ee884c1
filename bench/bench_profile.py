"""Where the server's time goes in a burst: a sampling profile of fastjob-server during bench_e2e's burst.

    python bench/bench_profile.py [--jobs 10000] [--lead-time 2] [--scan-horizon 5] [--rate 250] [--top 15]
                                  [--quick] [--json PATH]

The workload is bench_e2e's (``--jobs`` one-shot jobs due at one instant, a real server process,
one worker in this process). ``py-spy record --format raw --nonblocking`` attaches to the server
as soon as it is ready and samples it until every instance row is final; then it is stopped
(SIGINT) and writes its collapsed stacks. Each sample is charged to its innermost frame (self
time); the table groups them by function and shows the line most sampled in it, with its share
of all samples (py-spy leaves out samples of an idle thread, so the shares are of busy time).

If py-spy is not installed or cannot attach (no ptrace permission), the burst runs again with
the server under cProfile (bench/_profiled.py: ``python -m cProfile -o`` but timed in CPU
seconds, so the event loop's waiting is left out) and the top functions by tottime are shown
instead (cProfile's own overhead inflates call-heavy functions, and CPU time of the store's
thread is charged to whatever the main thread is running).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from _figures import Figure, add_json_option, figure, write
from bench_e2e import Burst, measure_fastjob

FRAME = re.compile(r"^(?P<func>.*) \((?P<where>.*):(?P<line>\d+)\)$")
SHOWN_IN_TABLE = 5  # the suite's summary shows the first few; all are in results.json


@dataclass
class Spot:
    function: str
    where: str  # file:line (the line most sampled within the function)
    share: float  # of all samples (py-spy) or of all tottime (cProfile)


def short(path: str) -> str:
    """A path relative to the checkout or to site-packages: what a reader needs to find it."""
    for root in (str(BENCH.parent) + os.sep, "site-packages" + os.sep, "lib" + os.sep + "python"):
        if root in path:
            return path.split(root, 1)[1]
    return path


def fold_raw(text: str, top: int) -> list[Spot]:
    """Self samples per function from py-spy's raw (collapsed) output, most first."""
    per_func: collections.Counter[tuple[str, str]] = collections.Counter()
    per_line: collections.Counter[tuple[str, str, str]] = collections.Counter()
    total = 0
    for raw in text.splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf, n = stack.split(";")[-1], int(count)
        m = FRAME.match(leaf)
        func, where, line = (m["func"], short(m["where"]), m["line"]) if m else (leaf, "?", "0")
        per_func[(func, where)] += n
        per_line[(func, where, line)] += n
        total += n
    spots = []
    for (func, where), n in per_func.most_common(top):
        line = max((k for k in per_line if k[:2] == (func, where)), key=per_line.__getitem__)[2]
        spots.append(Spot(func, f"{where}:{line}", n / total))
    return spots


def py_spy() -> str | None:
    return shutil.which("py-spy") or next(
        (str(p) for p in [Path(sys.executable).parent / "py-spy"] if p.exists()), None)


async def run_with_py_spy(url: str, args: argparse.Namespace, out: Path) -> tuple[Burst, subprocess.Popen[bytes]]:
    """The burst with py-spy attached to the server from when it is ready."""
    exe = py_spy()
    assert exe is not None
    spy: list[subprocess.Popen[bytes]] = []

    def attach(server: subprocess.Popen[bytes]) -> None:
        spy.append(subprocess.Popen([exe, "record", "--pid", str(server.pid), "--format", "raw", "--nonblocking",
                                     "--rate", str(args.rate), "-o", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    burst = await measure_fastjob(url, args.jobs, args.lead, lead_time=args.lead_time, horizon=args.scan_horizon,
                                  on_server=attach)
    return burst, spy[0]


def stop_spy(spy: subprocess.Popen[bytes]) -> str:
    """SIGINT makes py-spy write what it sampled; returns its stderr (why, if it wrote nothing)."""
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)
    try:
        _, err = spy.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    return err.decode(errors="replace")


def profile_py_spy(args: argparse.Namespace, tmp: Path) -> list[Spot] | None:
    if py_spy() is None:
        print("  py-spy is not installed (pip install py-spy): falling back to cProfile")
        return None
    out = tmp / "server.raw"
    burst, spy = asyncio.run(run_with_py_spy(f"sqlite:///{tmp / 'spy.db'}", args, out))
    err = stop_spy(spy)
    text = out.read_text() if out.exists() else ""
    if not text.strip():
        print(f"  py-spy recorded nothing ({err.strip()[-300:] or 'no output'}): falling back to cProfile")
        return None
    print_burst("py-spy", burst)
    return fold_raw(text, args.top)


def profile_cprofile(args: argparse.Namespace, tmp: Path) -> list[Spot]:
    """The fallback: the server under cProfile; it writes its stats when it exits on SIGTERM."""
    out = tmp / "server.prof"
    burst = asyncio.run(measure_fastjob(f"sqlite:///{tmp / 'cprof.db'}", args.jobs, args.lead,
                                        lead_time=args.lead_time, horizon=args.scan_horizon,
                                        prefix=[str(BENCH / "_profiled.py"), str(out)]))
    print_burst("cProfile", burst)
    deadline = time.time() + 30
    while not out.exists() and time.time() < deadline:
        time.sleep(0.2)
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values()) or 1.0
    ranked = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:args.top]
    return [Spot(func, f"{short(path)}:{line}", v[2] / total) for (path, line, func), v in ranked]


def print_burst(tool: str, burst: Burst) -> None:
    ordered = sorted(burst.lateness)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3
    print(f"  burst under {tool}: {len(ordered):,} fires, p99 lateness {p99:.1f} ms (profiled, so slower than "
          f"bench_e2e's), every row final {burst.final_after:.2f}s after the due instant")


def report(tool: str, spots: list[Spot]) -> None:
    unit = "% of samples (self)" if tool == "py-spy" else "% of tottime"
    print(f"\ntop {len(spots)} hot spots of the server ({tool}; {unit})")
    print(f"{'':>3} {'%':>6}  {'function':<40} file:line")
    for i, s in enumerate(spots, 1):
        print(f"{i:>3} {s.share * 100:6.1f}  {s.function[:40]:<40} {s.where}")


def figures(tool: str, jobs: int, spots: list[Spot]) -> list[Figure]:
    out = []
    for i, s in enumerate(spots, 1):
        f = figure(f"profile burst {jobs:,} ({tool})", f"#{i} {s.function} {s.where}", s.share * 100, "%")
        f["hidden"] = i > SHOWN_IN_TABLE
        out.append(f)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--lead", type=float, default=None, help="seconds from seeding to the due instant")
    parser.add_argument("--lead-time", type=float, default=2.0, help="the server's --lead-time")
    parser.add_argument("--scan-horizon", type=float, default=5.0, help="the server's --scan-horizon")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--cprofile", action="store_true", help="use cProfile even if py-spy works")
    parser.add_argument("--quick", action="store_true", help="2,000 jobs")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.jobs = 2000
    args.lead = args.lead or max(8.0, 6.0 + args.jobs / 4000 + 2 * args.lead_time)
    print(f"profile of fastjob-server during a burst of {args.jobs:,} one-shot jobs (server --lead-time "
          f"{args.lead_time:g} --scan-horizon {args.scan_horizon:g}; one worker, max_concurrency {args.jobs + 1})")
    print("  (py-spy charges the uvloop's own C code, I/O and callbacks dispatch, to the Python frame that called"
          " it: Runner.run)")
    with tempfile.TemporaryDirectory(prefix="fastjob-profile-") as tmpdir:
        spots = None if args.cprofile else profile_py_spy(args, Path(tmpdir))
        tool = "py-spy"
        if spots is None:
            spots, tool = profile_cprofile(args, Path(tmpdir)), "cProfile"
    report(tool, spots)
    write(args.json, figures(tool, args.jobs, spots))


if __name__ == "__main__":
    main()
