"""Cron next-fire benchmark: the compiled evaluator, its pure-Python twin, and croniter.

    python bench/bench_cron.py            # the five expressions, in Europe/Berlin
    python bench/bench_cron.py --zone UTC --quick

How it measures: every call gets a new random start (uniform over 2020-2030, integer
epoch ms, drawn before timing), so no implementation is flattered by starting where the
previous fire ended. Figures are ns per next fire, best of --repeat runs, including the
Python loop and call.

* compiled: ``Cron.next_after`` of a parsed form kept by the caller (fastjob._cron);
  "+parse()" goes through ``parse(expr, zone)`` (its lru_cache) on every call, as a
  caller that keeps only the expression would.
* twin: the same with fastjob._cron_py.
* croniter fresh: what fastjob.schedule.cron_after does, a new croniter per fire from
  a datetime in the zone; croniter reused: one croniter object,
  ``get_next(float, start_time=...)``.

The zone's offset changes are cached per UTC year on first use; a warm-up pass over the
same starts fills them before timing (the one-off cost of a year is printed at the end).
Before timing an expression, the three are checked to give the same fires on 300 starts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import sys
import time
import zoneinfo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from croniter import croniter  # noqa: E402

from fastjob import _cron, _cron_py  # noqa: E402

EXPRESSIONS = [
    "* * * * * *",
    "*/5 * * * * *",
    "0 */5 9-17 * * mon-fri",
    "0 0 * * *",
    "30 2 * * *",
]
TARGET_NS, TARGET_REUSED, TARGET_FRESH = 1000.0, 25.0, 100.0
LO_MS = 1_577_836_800_000  # 2020-01-01
HI_MS = 1_893_456_000_000  # 2030-01-01
pc = time.perf_counter


def best_ns(run, starts: list[int], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = pc()
        run(starts)
        best = min(best, pc() - t0)
    return best / len(starts) * 1e9


def bench_cron(mod, expr: str, zone: str, starts: list[int], repeat: int) -> float:
    nxt = mod.parse(expr, zone).next_after

    def run(ts: list[int]) -> None:
        for t in ts:
            nxt(t)

    run(starts)  # warm-up: the zone table's years
    return best_ns(run, starts, repeat)


def bench_cron_parse(mod, expr: str, zone: str, starts: list[int], repeat: int):
    parse = mod.parse

    def run(ts: list[int]) -> None:
        for t in ts:
            parse(expr, zone).next_after(t)

    run(starts)
    return best_ns(run, starts, repeat)


def croniter_fresh(expr: str, tz, t: int) -> int:
    """As fastjob.schedule.cron_after: a new croniter from a datetime in the zone."""
    start = dt.datetime.fromtimestamp(t / 1000.0, tz)
    it = croniter(expr, start, second_at_beginning=len(expr.split()) == 6)
    return int(round(it.get_next(float) * 1000))


def bench_croniter_fresh(expr: str, zone: str, starts: list[int], repeat: int) -> float:
    tz = zoneinfo.ZoneInfo(zone)

    def run(ts: list[int]) -> None:
        for t in ts:
            croniter_fresh(expr, tz, t)

    return best_ns(run, starts, repeat)


def bench_croniter_reused(expr: str, zone: str, starts: list[int], repeat: int):
    tz = zoneinfo.ZoneInfo(zone)
    first = dt.datetime.fromtimestamp(starts[0] / 1000.0, tz)
    it = croniter(expr, first, second_at_beginning=len(expr.split()) == 6)

    def run(ts: list[int]) -> None:
        for t in ts:
            int(round(it.get_next(float, start_time=t / 1000.0) * 1000))

    return best_ns(run, starts, repeat)


def check_agreement(expr: str, zone: str, starts: list[int]) -> None:
    """The figures are only worth comparing if the three give the same fires."""
    tz = zoneinfo.ZoneInfo(zone)
    c, p = _cron.parse(expr, zone), _cron_py.parse(expr, zone)
    for t in starts:
        want = croniter_fresh(expr, tz, t)
        got, twin = c.next_after(t), p.next_after(t)
        if got != twin or (got != want and not _second_occurrence(want, tz)):
            sys.exit(
                f"disagreement on {expr!r} in {zone} after {t}: compiled {got}, "
                f"twin {twin}, croniter {want}"
            )


def _second_occurrence(at_ms: int, tz) -> bool:
    """croniter's second fire in a repeated hour: FastJob's documented difference."""
    when = dt.datetime.fromtimestamp(at_ms / 1000.0, tz)
    return when.fold == 1 and when.replace(fold=0).utcoffset() != when.utcoffset()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--zone", default="Europe/Berlin")
    ap.add_argument("--quick", action="store_true", help="fewer calls")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    scale = 0.2 if args.quick else 1.0
    counts = (200_000, 20_000, 3_000, 1_500)
    n_c, n_py, n_reused, n_fresh = (int(k * scale) for k in counts)
    starts = [rng.randint(LO_MS, HI_MS) for _ in range(n_c)]
    zone = args.zone

    print(
        "cron next fire, ns per call; a new random start (2020-2030) for every call; "
        f"zone {zone}; Python {sys.version.split()[0]}"
    )
    cols = ("compiled", "+parse()", "twin", "croniter", "croniter", "reused/", "fresh/")
    print(f"{'expression':24}" + "".join(f"{c:>10}" for c in cols))
    cols2 = ("", "", "", "reused", "fresh", "compiled", "compiled")
    print(f"{'':24}" + "".join(f"{c:>10}" for c in cols2))
    worst_ns, worst_reused, worst_fresh = 0.0, float("inf"), float("inf")
    for expr in EXPRESSIONS:
        check_agreement(expr, zone, starts[:300])
        c = bench_cron(_cron, expr, zone, starts, args.repeat)
        cp = bench_cron_parse(_cron, expr, zone, starts, args.repeat)
        py = bench_cron(_cron_py, expr, zone, starts[:n_py], args.repeat)
        reused = bench_croniter_reused(expr, zone, starts[:n_reused], args.repeat)
        fresh = bench_croniter_fresh(expr, zone, starts[:n_fresh], args.repeat)
        worst_ns = max(worst_ns, c)
        worst_reused = min(worst_reused, reused / c)
        worst_fresh = min(worst_fresh, fresh / c)
        figures = "".join(f"{x:10.0f}" for x in (c, cp, py, reused, fresh))
        print(f"{expr:24}{figures}{reused / c:9.0f}x{fresh / c:9.0f}x")

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(
        f"target compiled <= {TARGET_NS:.0f} ns per next fire: worst {worst_ns:.0f} ns,"
        " "
        f"{verdict(worst_ns <= TARGET_NS)}"
    )
    print(
        f"target >= {TARGET_REUSED:.0f}x croniter reused: worst {worst_reused:.0f}x, "
        f"{verdict(worst_reused >= TARGET_REUSED)}"
    )
    print(
        f"target >= {TARGET_FRESH:.0f}x croniter fresh: worst {worst_fresh:.0f}x, "
        f"{verdict(worst_fresh >= TARGET_FRESH)}"
    )
    loop = best_ns(lambda ts: [None for _ in ts], starts, args.repeat)
    t0 = pc()
    _cron_py._scan_year(zoneinfo.ZoneInfo(zone), 2101)
    scan_ms = (pc() - t0) * 1000
    print(
        f"(the bare Python loop over the starts is {loop:.0f} ns of each figure; the "
        f"first use of a UTC year of a zone costs {scan_ms:.1f} ms, once per process, "
        "to find its offset changes; never for UTC and Etc/* zones)"
    )


if __name__ == "__main__":
    main()
