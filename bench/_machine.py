"""What the figures were measured on: machine, versions, commit, date (results.json's "meta").

Figures from a shared 2-core box mean little without it; the ratios against same-run
baselines are what carries over to another machine.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    """A read-only git query on the checkout the benchmarks ran from."""
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mariadb_version(dsn: str | None) -> str:
    """The server's VERSION(), or why there is none: the MariaDB cases are skipped then."""
    if not dsn:
        return "not used"
    try:
        import pymysql

        parts = urlsplit(dsn)
        conn = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                               password=parts.password or "", connect_timeout=3)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                row = cur.fetchone()
                return str(row[0]) if row else "unknown"
        finally:
            conn.close()
    except Exception as exc:  # any failure means: not reachable for this run
        return f"unreachable ({type(exc).__name__}: {exc})"


def machine_info(quick: bool, mysql_dsn: str | None) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": _ram_gb(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "uvloop": _version("uvloop"),
        "msgpack": _version("msgpack"),
        "apscheduler": _version("apscheduler"),
        "apscheduler4": "not available on this machine (only 3.x on its package index)",
        "sqlite": sqlite3.sqlite_version,
        "mariadb": mariadb_version(mysql_dsn),
        "fastjob_commit": _git("rev-parse", "HEAD"),
        "fastjob_uncommitted_changes": bool(_git("status", "--porcelain", "--", "fastjob")),
    }
