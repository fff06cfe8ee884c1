"""FastJob's own test harness: its worker processes and direct reads of the database.

The server processes, ``wait_until`` and the fast-cluster flags live in :mod:`fastjob.testing`
(shipped, so that users can test their workers the same way); they are re-exported here."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from fastjob.models import UNFINISHED_STATUSES
from fastjob.testing import FAST_CLUSTER_ARGS, ServerFactory, ServerProcess, next_event, wait_until

__all__ = ["FAST_CLUSTER_ARGS", "ServerFactory", "ServerProcess", "next_event", "wait_until"]

class WorkerProcess:
    """A worker in its own process (tests/sl_worker.py), so it can be killed with -9."""

    def __init__(self, server: str, worker_id: str, out_path: Path, period: float, log_path: Path) -> None:
        self.argv = [sys.executable, str(Path(__file__).with_name("sl_worker.py")), server, worker_id,
                     str(out_path), str(period)]
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 20.0) -> None:
        repo = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        with open(self.log_path, "ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdout=asyncio.subprocess.PIPE, stderr=log_file, env=env)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if line.strip() != b"READY":
            self.kill()
            raise RuntimeError(f"worker did not start: {self.log_path.read_text(errors='replace')[-2000:]}")

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def close(self) -> None:
        self.signal(signal.SIGCONT)  # a stopped process cannot die of SIGKILL until it runs
        self.kill()
        if self.proc is not None:
            await asyncio.wait_for(self.proc.wait(), 10)


class ProcWorker:
    """A worker in its own process (tests/worker_proc.py, or another ``script`` there), recording its
    runs in a ledger."""

    def __init__(self, config: dict[str, Any], log_path: Path, script: str = "worker_proc.py") -> None:
        self.config = config
        self.script = script
        self.worker_id = config["worker_id"]
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30.0) -> ProcWorker:
        import json

        here = Path(__file__).resolve().parent
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(here.parent), str(here), os.environ.get("PYTHONPATH")])), PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(here / self.script), json.dumps(self.config),
                stdout=asyncio.subprocess.PIPE, stderr=log_file, env=env)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if line.strip() != b"READY":
            self.signal(signal.SIGKILL)
            raise RuntimeError(f"worker did not start: {self.log_path.read_text(errors='replace')[-2000:]}")
        return self

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def close(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        if self.proc is None:
            return
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except asyncio.TimeoutError:
            self.kill()
            await asyncio.wait_for(self.proc.wait(), 10)


def db_rows(db: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the database directly (SQLite file or MySQL URL), as an operator would; ``?`` placeholders."""
    if db.startswith("sqlite:///"):
        import sqlite3

        conn = sqlite3.connect(db[len("sqlite:///"):])
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    from conftest import _admin_connect

    conn = _admin_connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(f"USE `{db.rsplit('/', 1)[1]}`")
            cur.execute(sql.replace("?", "%s"), params)
            return list(cur.fetchall())
    finally:
        conn.close()


def app_row(db: str, app: str) -> tuple[Any, Any]:
    """(owner, epoch) of an app."""
    rows = db_rows(db, "SELECT owner, epoch FROM apps WHERE name = ?", (app,))
    return rows[0] if rows else (None, None)


def instance_rows(db: str, app: str, job: str) -> list[dict[str, Any]]:
    """Every instance of one job, as dicts."""
    cols = ["id", "planned_ms", "attempt", "status", "trigger_kind", "server", "epoch", "worker", "error",
            "started_at", "finished_at", "reruns"]
    rows = db_rows(db, f"SELECT {', '.join('i.' + c for c in cols)} FROM instances i JOIN jobs j ON j.id = i.job_id"
                   " WHERE j.app = ? AND j.name = ? ORDER BY i.planned_ms, i.attempt", (app, job))
    return [dict(zip(cols, r, strict=True)) for r in rows]


UNFINISHED = tuple(status.value for status in UNFINISHED_STATUSES)


def settled_rows(db: str, app: str, job: str, planned: list[int]) -> list[dict[str, Any]] | None:
    """The job's rows once the last attempt of every planned fire is final, else None."""
    rows = instance_rows(db, app, job)
    last: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row["planned_ms"] not in last or row["attempt"] > last[row["planned_ms"]]["attempt"]:
            last[row["planned_ms"]] = row
    done = all(t in last and last[t]["status"] not in UNFINISHED for t in planned)
    return rows if done else None
