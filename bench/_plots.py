"""The suite's PNG plots (bench/plots/), drawn from the run's samples and figures.

* burst_lateness.png: each fire's lateness in the order the fires started, per burst size, for
  FastJob, the call_at floor and APScheduler 3 (every fire is due at one instant, so this is
  the lateness over the burst's time);
* throughput_workers.png: final rows/s against the number of worker processes, per store, with
  the targets;
* lateness_cdf.png: the lateness CDF of FastJob against APScheduler 3 (and the floor), for the
  largest burst and the largest cron load measured.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

STYLE = {"fastjob": "tab:blue", "floor": "tab:gray", "call_at": "tab:gray", "apscheduler3": "tab:red",
         "aps3": "tab:orange"}
MAX_POINTS = 20_000  # per line: more only slows the drawing


def _color(name: str) -> str:
    if "asyncio" in name and ("aps" in name or "apscheduler" in name):
        return STYLE["aps3"]
    return next((c for key, c in STYLE.items() if name.startswith(key)), "tab:green")


def _thin(values: list[float]) -> tuple[list[int], list[float]]:
    step = max(1, len(values) // MAX_POINTS)
    return list(range(0, len(values), step)), values[::step]


def _sizes(samples: Path, prefix: str) -> list[tuple[int, dict[str, Any]]]:
    found = []
    for path in samples.glob(f"{prefix}-*.json"):
        found.append((int(path.stem.split("-")[1]), json.loads(path.read_text())))
    return sorted(found, key=lambda kv: kv[0])


def burst_lateness(samples: Path, out: Path) -> Path | None:
    bursts = _sizes(samples, "burst")
    if not bursts:
        return None
    fig, axes = plt.subplots(1, len(bursts), figsize=(5.5 * len(bursts), 4.2), squeeze=False)
    for ax, (jobs, data) in zip(axes[0], bursts, strict=True):
        for name, series in data["series"].items():
            ordered = sorted(series["lateness"])
            xs, ys = _thin([x * 1e3 for x in ordered])
            ax.plot(xs, ys, label=name, color=_color(name), lw=1.4)
        ax.set_title(f"burst of {jobs:,} fires due at one instant")
        ax.set_xlabel("fires started, in order")
        ax.set_ylabel("lateness (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "burst_lateness.png")


def throughput_workers(figures: list[dict[str, Any]], out: Path) -> Path | None:
    """Per store: the best offered load's final rows/s (solid) and each offered load's (dotted)."""
    per_store: dict[str, list[dict[str, Any]]] = {}
    for f in figures:
        if f["case"].startswith("throughput") and f.get("workers") and f.get("value") is not None:
            per_store.setdefault(f["case"].split()[-1], []).append(f)
    if not per_store:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    for i, (store, figs) in enumerate(sorted(per_store.items())):
        color = f"C{i}"
        shown = sorted((f["workers"], f["value"]) for f in figs if f.get("best", True))
        ax.plot([w for w, _ in shown], [v for _, v in shown], "o-", color=color, label=f"{store}: best load")
        for offered in sorted({int(f["offered"]) for f in figs if f.get("offered")}):
            pts = sorted((f["workers"], f["value"]) for f in figs if f.get("offered") == offered)
            ax.plot([w for w, _ in pts], [v for _, v in pts], ":", color=color, lw=1, marker=".",
                    label=f"{store}: offered {offered:,}/s")
        ax.axhline(figs[0]["target_value"], color=color, ls="--", lw=1, label=f"{store} target")
    ax.set_xlabel("worker processes")
    ax.set_ylabel("fires with a stored final result per second")
    ax.set_xticks(sorted({f["workers"] for figs in per_store.values() for f in figs}))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("sustained end-to-end throughput")
    return _save(fig, out / "throughput_workers.png")


def lateness_cdf(samples: Path, out: Path) -> Path | None:
    panels = []
    bursts, crons = _sizes(samples, "burst"), _sizes(samples, "cron")
    if bursts:
        jobs, data = bursts[-1]
        panels.append((f"burst of {jobs:,}", {k: [x * 1e3 for x in v["lateness"]] for k, v in data["series"].items()}))
    if crons:
        jobs, data = crons[-1]
        panels.append((f"{jobs:,} per-second cron jobs (steady)", data[str(jobs)]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        for name, values in series.items():
            ordered = sorted(values)
            if not ordered:
                continue
            idx, ys = _thin(ordered)
            ax.plot(ys, [(i + 1) / len(ordered) for i in idx], label=name, color=_color(name), lw=1.4)
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_title(f"lateness CDF: {title}")
        ax.set_xlabel("lateness (ms, log)")
        ax.set_ylabel("fraction of fires")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return _save(fig, out / "lateness_cdf.png")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_all(samples: Path, figures: list[dict[str, Any]], out: Path) -> list[Path]:
    """Every plot the run has data for."""
    out.mkdir(parents=True, exist_ok=True)
    made = [burst_lateness(samples, out), throughput_workers(figures, out), lateness_cdf(samples, out)]
    return [p for p in made if p is not None]
