"""Running one case: its script as a subprocess, its output shown as it comes, its time budget kept.

The script runs in a session (process group) of its own, so that a case over its budget is
stopped together with the servers and workers it started, and none is left behind to disturb
the next case. Every line goes to the case's log whole; the terminal gets it prefixed with the
case's name and elapsed seconds, cut to one screen line.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WIDTH = 150  # terminal columns a progress line may take
QUIET_S = 20.0  # a line that says the case is still alive, after this long without output


@dataclass
class Outcome:
    case: str
    status: str  # ok, failed, timed out, skipped
    seconds: float
    argv: list[str]
    returncode: int | None = None
    detail: str = ""  # why it failed or was skipped
    figures: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"case": self.case, "status": self.status, "seconds": round(self.seconds, 1), "argv": self.argv,
                "returncode": self.returncode, "detail": self.detail}


def _pump(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    for raw in stream:
        lines.put(raw.decode(errors="replace").rstrip("\n"))
    lines.put(None)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to the case's whole process group first (the scripts' finally blocks then drop their
    temporary databases and folders), SIGTERM and SIGKILL to what is left after a grace."""
    for sig, grace in ((signal.SIGINT, 15.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue


def _reap_group(pgid: int) -> None:
    """After the script exited: anything of its group still running is a leftover; end it."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _show(name: str, began: float, line: str) -> None:
    text = f"  [{name} {time.monotonic() - began:5.0f}s] {line}"
    print(text if len(text) <= WIDTH else text[:WIDTH - 1] + "…", flush=True)


def _follow(name: str, proc: subprocess.Popen[bytes], budget: float, log: IO[str]) -> tuple[bool, list[str]]:
    """Show and log the output until the script ends or its budget runs out; (in time?, last lines)."""
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    began, last_output = time.monotonic(), time.monotonic()
    tail: list[str] = []
    while True:
        if time.monotonic() - began > budget:
            _stop_group(proc)
            return False, tail
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if time.monotonic() - last_output > QUIET_S:
                _show(name, began, "… still running")
                last_output = time.monotonic()
            continue
        if line is None:
            proc.wait()
            return True, tail
        log.write(line + "\n")
        tail = (tail + [line])[-8:]
        last_output = time.monotonic()
        _show(name, began, line)


def run_case(name: str, script: str, argv: list[str], budget: float, workdir: Path) -> Outcome:
    """Run bench/``script`` with ``argv`` and ``--json``; its figures, or why there are none."""
    out = workdir / f"{name}.json"
    cmd = [sys.executable, "-u", str(BENCH / script), *argv, "--json", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    began = time.monotonic()
    with open(workdir / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        in_time, tail = _follow(name, proc, budget, log)
    _reap_group(proc.pid)
    seconds = time.monotonic() - began
    shown = [f"bench/{script}", *argv]
    if not in_time:  # a script that writes its figures as it goes (bench_throughput) keeps what it had
        return Outcome(name, "timed out", seconds, shown, proc.returncode,
                       f"over its {budget:.0f}s budget; stopped. Last output: " + " | ".join(tail[-3:]),
                       figures=json.loads(out.read_text()) if out.exists() else [])
    if proc.returncode != 0 or not out.exists():
        return Outcome(name, "failed", seconds, shown, proc.returncode,
                       f"exit status {proc.returncode}: " + " | ".join(tail[-3:]))
    return Outcome(name, "ok", seconds, shown, 0, figures=json.loads(out.read_text()))
