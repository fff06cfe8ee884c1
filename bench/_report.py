"""The suite's one table (terminal and README) and the README's results section.

One row per headline figure: case, metric, value, the same-run baseline, their ratio, the
target and PASS/FAIL. A case that failed gets one FAIL row saying why, so a broken benchmark
is never mistaken for a quiet one.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ._runner import Outcome

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
COLUMNS = ("case", "metric", "value", "baseline", "ratio", "target", "result")


def number(x: float | None, unit: str = "") -> str:
    """Three significant figures or so, thousands separated; '-' for nothing."""
    if x is None:
        return "-"
    if abs(x) >= 1000:
        text = f"{x:,.0f}"
    elif abs(x) >= 100:
        text = f"{x:.0f}"
    elif abs(x) >= 10:
        text = f"{x:.1f}"
    else:
        text = f"{x:.3g}"
    return f"{text} {unit}".strip()


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def rows(outcomes: list[Outcome]) -> list[tuple[str, ...]]:
    """The table's rows: every shown figure of every case, or the case's failure."""
    out: list[tuple[str, ...]] = []
    said: set[str] = set()
    for o in outcomes:
        if o.status != "ok":
            out.append((o.case, f"({o.status}: {o.detail[:90]})", "-", "-", "-", "-",
                        "SKIP" if o.status == "skipped" else "FAIL"))
        for f in o.figures:
            if f.get("hidden") or (f.get("value") is None and f.get("note") in said):
                continue  # a note with no figure (APScheduler 4) is said once
            if f.get("value") is None and f.get("note"):
                said.add(f["note"])
            metric = f["metric"] + (f" [{f['note']}]" if f.get("value") is None and f.get("note") else "")
            ratio = "-" if f.get("ratio") is None else f"{f['ratio']:.2f}x"
            out.append((f["case"], metric, number(f.get("value"), f.get("unit", "")),
                        number(f.get("baseline"), f.get("unit", "")), ratio, f.get("target") or "-",
                        verdict(f.get("ok"))))
    return out


MAX_WIDTH = (28, 56, 20, 20, 8, 20, 6)  # per column, in the terminal (the README's table is not cut)


def text_table(table: list[tuple[str, ...]]) -> str:
    widths = [min(cap, max(len(r[i]) for r in [COLUMNS, *table])) for i, cap in enumerate(MAX_WIDTH)]
    lines = []
    for r in [COLUMNS, *table]:
        cells = [c if len(c) <= w else c[:w - 1] + "…" for c, w in zip(r, widths, strict=True)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(table: list[tuple[str, ...]]) -> str:
    def cell(c: str) -> str:
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in table]
    return "\n".join(lines)


def counts(outcomes: list[Outcome]) -> str:
    figs = [f for o in outcomes for f in o.figures if not f.get("hidden")]
    passed = sum(1 for f in figs if f.get("ok") is True)
    failed = sum(1 for f in figs if f.get("ok") is False)
    broken = sum(1 for o in outcomes if o.status not in ("ok", "skipped"))
    return f"{passed} targets met, {failed} missed, {broken} case(s) failed to run"


def readme_section(outcomes: list[Outcome], meta: dict[str, Any], wall_s: float, plots: list[Path]) -> str:
    """The text between the README's results markers."""
    head = (f"Latest full run: {meta['date']}, fastjob commit `{meta['fastjob_commit'][:12]}`, "
            f"{meta['cpu_model']} ({meta['cores']} cores, {meta['ram_gb']} GB), Linux {meta['kernel']}, "
            f"Python {meta['python']}, uvloop {meta['uvloop']}, SQLite {meta['sqlite']}, "
            f"MariaDB {meta['mariadb']}, APScheduler {meta['apscheduler']}; load average at start "
            f"{meta['load_average_at_start']}. Wall time {wall_s / 60:.1f} min. {counts(outcomes)}.")
    times = ", ".join(f"{o.case} {o.seconds:.0f}s" for o in outcomes)
    pics = "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots)
    return f"{head}\n\nCase times: {times}.\n\n{markdown_table(rows(outcomes))}\n\n{pics}\n".rstrip() + "\n"


def update_readme(readme: Path, section: str) -> bool:
    """Rewrite the text between the markers; False if the README has none."""
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{section}{END}", text))
    return True
