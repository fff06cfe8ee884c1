"""Shared test fixtures.

MySQL tests read their DSN from FASTJOB_TEST_MYSQL_DSN (e.g. mysql://root@127.0.0.1:3306/test).
Without it they skip, unless FASTJOB_REQUIRE_MYSQL=1 (set by .ci/run), where they fail instead.
Each test session works in a database of its own, created here and dropped at the end, so
concurrent runs on one MariaDB never see each other's rows.
"""
from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import harness

from private_mariadb import private_mariadb  # noqa: E402,F401  (a fixture for every test module)

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on CPython/Linux
    uvloop = None

#: The event loop implementations every socket scenario runs on (the server itself runs on uvloop).
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
if uvloop is not None:
    LOOPS["uvloop"] = uvloop.new_event_loop


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Run a coroutine to completion on a fresh loop of the parametrized kind, with a timeout."""

    def runner(coro: Awaitable[Any], timeout: float = 15.0) -> Any:
        loop = LOOPS[request.param]()
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, timeout))
        finally:
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            if leftovers:
                loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return runner


MYSQL_DSN_ENV = "FASTJOB_TEST_MYSQL_DSN"
#: Markers of tests that need a service; with FASTJOB_REQUIRE_SERVICES=1 (CI) skipping one fails the run.
SERVICE_MARKERS = ("mysql", "postgres", "browser")
_SERVICE_FIXTURES = {"mysql_dsn": "mysql", "mysql_session_dsn": "mysql", "private_mariadb": "mysql"}
_service_skips: list[tuple[str, str]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses a service, whether it asks for the fixture or a parametrized backend."""
    for item in items:
        needed = {_SERVICE_FIXTURES[f] for f in getattr(item, "fixturenames", ()) if f in _SERVICE_FIXTURES}
        params = getattr(getattr(item, "callspec", None), "params", {})
        needed |= {value for value in params.values() if isinstance(value, str) and value in SERVICE_MARKERS}
        for name in needed:
            item.add_marker(name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and any(item.get_closest_marker(m) for m in SERVICE_MARKERS):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _service_skips.append((item.nodeid, reason))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int) -> None:
    stats = terminalreporter.stats
    counts = {key: len(stats.get(key, [])) for key in ("passed", "failed", "error", "skipped", "xfailed")}
    terminalreporter.write_line("FASTJOB TESTS: " + ", ".join(f"{n} {key}" for key, n in counts.items()))
    for nodeid, reason in _service_skips:
        terminalreporter.write_line(f"SERVICE TEST SKIPPED: {nodeid}: {reason}", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped service test is a failure: the service was missing, so nothing was tested."""
    if _service_skips and os.environ.get("FASTJOB_REQUIRE_SERVICES") == "1":
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def mysql_dsn_or_skip() -> str:
    dsn = os.environ.get(MYSQL_DSN_ENV)
    if not dsn:
        if os.environ.get("FASTJOB_REQUIRE_MYSQL") == "1":
            pytest.fail(f"FASTJOB_REQUIRE_MYSQL=1 but {MYSQL_DSN_ENV} is not set")
        pytest.skip(f"set {MYSQL_DSN_ENV} to run the MySQL tests")
    return dsn


def _admin_connect(dsn: str):
    import pymysql

    parts = urlsplit(dsn)
    return pymysql.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        autocommit=True,
    )


@pytest.fixture(scope="session")
def mysql_session_dsn() -> Iterator[str]:
    """A DSN naming a fresh, empty database that lives for the test session."""
    base = mysql_dsn_or_skip()
    name = f"fastjob_t_{uuid.uuid4().hex[:10]}"
    try:
        conn = _admin_connect(base)
    except Exception as exc:  # a configured but unreachable server is a failure, not a skip
        pytest.fail(f"cannot reach MySQL at {base}: {exc}")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    conn.close()
    parts = urlsplit(base)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))
    finally:
        # a new connection: tests may have restarted MariaDB since the one above was open
        conn = _admin_connect(base)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture
def mysql_dsn(mysql_session_dsn: str) -> Iterator[str]:
    """The session database, emptied of FastJob's tables before each test."""
    conn = _admin_connect(mysql_session_dsn)
    db = urlsplit(mysql_session_dsn).path.lstrip("/")
    with conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (db,))
        tables = [row[0] for row in cur.fetchall()]
        cur.execute("SET FOREIGN_KEY_CHECKS = 0")
        for table in tables:
            cur.execute(f"DROP TABLE IF EXISTS `{db}`.`{table}`")
    conn.close()
    yield mysql_session_dsn


@pytest.fixture
async def servers(tmp_path):
    """A factory of real server processes; every one is killed when the test ends."""
    from harness import ServerFactory

    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        await factory.close()


@pytest.fixture(params=["sqlite", "mysql"])
def db_url(request, tmp_path) -> str:
    """A database URL for end-to-end tests: a temporary SQLite file, or the MySQL test database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fastjob.db'}"
    return request.getfixturevalue("mysql_dsn")


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'fastjob.db'}"
