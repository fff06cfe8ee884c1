"""The one-command benchmark suite: ``python -m bench [--quick] [--only NAME[,NAME]] [--mysql-dsn DSN]
[--out bench/results.json] [--no-plots]``.

Runs every case of bench/suite.py, each as a subprocess of its script, one after the other (the
machine has few cores: cases side by side would measure each other). Shows each case's output as
it comes, then one table of every headline figure beside its same-run baseline and target;
writes the figures and what they were measured on to ``--out``, the plots to bench/plots/, and,
after a full run of every case, the README's results section.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import _report
from ._machine import machine_info
from ._runner import BENCH, Outcome, run_case
from .suite import Case, Context, select

APS4 = "APScheduler 4: not available on this machine (only 3.x on its package index): not measured"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes: checks the pipeline")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME]", help="run only these cases")
    parser.add_argument("--mysql-dsn", default="mysql://root@127.0.0.1:3306/test",
                        help="MariaDB/MySQL server for the MariaDB cases (they create and drop databases of their own)")
    parser.add_argument("--out", default=str(BENCH / "results.json"), help="where the figures go (JSON)")
    parser.add_argument("--no-plots", action="store_true", help="draw no PNGs")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser.parse_args()


def list_cases() -> None:
    for c in select(None):
        quick = "full only" if c.quick is None else f"quick {c.quick_budget:.0f}s"
        print(f"{c.name:18} {c.script:20} budget {c.budget:.0f}s, {quick}: {c.what}")


def run_all(cases: list[Case], ctx: Context, workdir: Path) -> list[Outcome]:
    """Each case in turn; a failed one is recorded and the rest still run."""
    outcomes = []
    runs = [(case, argv) for case in cases if (argv := case.argv(ctx)) is not None]
    for i, (case, argv) in enumerate(runs, 1):
        print(f"\n== [{i}/{len(runs)}] {case.name}: {case.what} (budget {case.time_budget(ctx.quick):.0f}s)",
              flush=True)
        if case.needs_mysql and ctx.mysql_dsn is None:
            outcomes.append(Outcome(case.name, "skipped", 0.0, [case.script, *argv], detail="MariaDB not reachable"))
            print("  skipped: MariaDB not reachable")
            continue
        outcome = run_case(case.name, case.script, argv, case.time_budget(ctx.quick), workdir)
        print(f"== {case.name}: {outcome.status} in {outcome.seconds:.0f}s"
              + (f" ({outcome.detail})" if outcome.detail else ""), flush=True)
        outcomes.append(outcome)
    return outcomes


def draw(samples: Path, figures: list[dict[str, Any]], out: Path) -> list[Path]:
    """The PNGs, or a note why there are none (matplotlib is a bench extra, not a dependency)."""
    try:
        from ._plots import make_all
    except ImportError as exc:
        print(f"no plots: {exc} (pip install 'fastjob[bench]')")
        return []
    return make_all(samples, figures, out)


def save(path: Path, meta: dict[str, Any], outcomes: list[Outcome], wall_s: float) -> None:
    result = {"meta": dict(meta, wall_seconds=round(wall_s, 1)), "cases": [o.summary() for o in outcomes],
              "figures": [f for o in outcomes for f in o.figures]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    args = parse_args()
    if args.list:
        list_cases()
        return
    began = time.monotonic()
    cases = select(args.only)
    meta = machine_info(args.quick, args.mysql_dsn)
    mysql_ok = not meta["mariadb"].startswith(("unreachable", "not used"))
    print(f"fastjob bench{' --quick' if args.quick else ''}: {len(cases)} case(s) on {meta['cpu_model']}, "
          f"{meta['cores']} cores, load {meta['load_average_at_start']}; commit {meta['fastjob_commit'][:12]}; "
          f"MariaDB {meta['mariadb']}\n{APS4}")
    workdir = Path(tempfile.mkdtemp(prefix="fastjob-bench-"))
    samples = workdir / "samples"
    samples.mkdir()
    ctx = Context(args.quick, args.mysql_dsn if mysql_ok else None, samples)
    outcomes = run_all(cases, ctx, workdir)
    figures = [f for o in outcomes for f in o.figures]
    plots = [] if args.no_plots else draw(samples, figures, BENCH / "plots")
    wall_s = time.monotonic() - began
    print(f"\n{_report.text_table(_report.rows(outcomes))}\n")
    print(f"{_report.counts(outcomes)}; wall time {wall_s:.0f}s ({'quick' if args.quick else 'full'} run)")
    print(APS4)
    save(Path(args.out), meta, outcomes, wall_s)
    print(f"figures: {args.out}; logs of each case: {workdir}" + (f"; plots: {BENCH / 'plots'}" if plots else ""))
    if not args.quick and args.only is None:
        readme = BENCH / "README.md"
        if _report.update_readme(readme, _report.readme_section(outcomes, meta, wall_s, plots)):
            print(f"results section of {readme} rewritten")
    shutil.rmtree(samples, ignore_errors=True)
    sys.exit(0 if all(o.status in ("ok", "skipped") for o in outcomes) else 1)


if __name__ == "__main__":
    main()
