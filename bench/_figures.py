"""Headline figures a bench script hands to the suite (``python -m bench``) through ``--json PATH``.

Every script keeps its own human table; this is the machine-readable part. A figure is a dict
{"case", "metric", "value", "unit", "baseline", "ratio", "target", "ok"}: ``ratio`` is value /
baseline (a baseline measured in the same run, so that a noisy shared machine cancels out), and
``target`` says in words what ``ok`` checked, on the ratio or on the value.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

Figure = dict[str, Any]


def _finite(x: float | None) -> float | None:
    """JSON has no NaN or infinity: a figure that could not be measured is null."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def _check(value: float | None, ratio: float | None, *, ratio_max: float | None, ratio_min: float | None,
           value_max: float | None, value_min: float | None, unit: str) -> tuple[str | None, bool | None]:
    """The target's words and whether it was met (None: no target, or nothing to judge)."""
    bounds = [(ratio, "<=", ratio_max, "x baseline"), (ratio, ">=", ratio_min, "x baseline"),
              (value, "<=", value_max, unit), (value, ">=", value_min, unit)]
    texts, oks = [], []
    for measured, op, bound, what in bounds:
        if bound is None:
            continue
        texts.append(f"{op} {bound:g} {what}".strip())
        if measured is None:
            oks.append(False)
        else:
            oks.append(measured <= bound if op == "<=" else measured >= bound)
    if not texts:
        return None, None
    return " and ".join(texts), all(oks)


def figure(case: str, metric: str, value: float | None, unit: str, *, baseline: float | None = None,
           ratio_max: float | None = None, ratio_min: float | None = None, value_max: float | None = None,
           value_min: float | None = None, note: str = "") -> Figure:
    """One headline figure; the ratio and the verdict are computed here so every script judges alike."""
    value, baseline = _finite(value), _finite(baseline)
    ratio = value / baseline if value is not None and baseline else None
    target, ok = _check(value, ratio, ratio_max=ratio_max, ratio_min=ratio_min, value_max=value_max,
                        value_min=value_min, unit=unit)
    out: Figure = {"case": case, "metric": metric, "value": value, "unit": unit, "baseline": baseline,
                   "ratio": ratio, "target": target, "ok": ok}
    if note:
        out["note"] = note
    return out


def write(path: str | None, figures: list[Figure]) -> None:
    """Write the figures for the suite; a script run by hand (no --json) writes nothing."""
    if path:
        Path(path).write_text(json.dumps(figures, indent=1))


def add_json_option(parser: Any) -> None:
    """The same ``--json PATH`` option on every script the suite runs."""
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the headline figures as JSON (python -m bench reads it)")
