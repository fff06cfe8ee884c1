"""A private MariaDB server for tests that must stop, kill or restart the database.

The machine's shared MariaDB (FASTJOB_TEST_MYSQL_DSN) serves every concurrent test run, so no
test may restart it. A test that needs an outage uses its own server instead::

    from private_mariadb import private_mariadb  # noqa: F401  (makes the fixture visible)

    async def test_x(private_mariadb):
        store = MySQLStore.from_url(private_mariadb.dsn + "?retry_total=30")
        ...
        await asyncio.to_thread(private_mariadb.restart)

``PrivateMariaDB`` installs a fresh data directory, runs ``mariadbd`` as a child process on
127.0.0.1 and a free port outside the ephemeral range (so no outgoing connection can take the
port while the server is down), and keeps that port across ``stop()``/``start()``/``restart()``/
``kill()``. Its ``dsn`` names database ``test`` (created at every start, if missing), as root
without a password. Everything is bounded in time; failures raise ``PrivateMariaDBError``
carrying the tail of the server's error log.

The ``private_mariadb`` fixture yields a started server and always shuts it down; if MariaDB
is not installed it fails the test (it never skips). On Linux the server is started under
``setpriv --pdeathsig KILL`` from a long-lived thread, so it dies with the test process even
when that process is killed without running its teardown.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pymysql
import pytest

MARIADBD = "/usr/sbin/mariadbd"
INSTALLERS = ("mariadb-install-db", "mysql_install_db")
HOST = "127.0.0.1"
DATABASE = "test"

# Small and quick: no binary log, no performance schema, no buffer-pool dump/load.
# (The charset matches the shared server's configuration.)
SERVER_OPTIONS = (
    "--skip-name-resolve",
    "--skip-log-bin",
    "--performance-schema=OFF",
    "--innodb-buffer-pool-size=16M",
    "--innodb-log-file-size=16M",
    "--innodb-buffer-pool-load-at-startup=0",
    "--innodb-buffer-pool-dump-at-shutdown=0",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
    "--max-connections=200",
)
INSTALL_OPTIONS = (
    "--auth-root-authentication-method=normal",  # root@localhost/127.0.0.1, no password
    "--skip-test-db",
    "--skip-name-resolve",
    "--innodb-buffer-pool-size=16M",
    "--innodb-log-file-size=16M",
)
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes


class PrivateMariaDBError(RuntimeError):
    pass


def find_installer() -> str | None:
    for name in INSTALLERS:
        path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/local/bin:/usr/sbin")
        if path:
            return path
    return None


def missing_tools(mariadbd: str = MARIADBD) -> list[str]:
    """What is missing to run a private server (empty when everything is there)."""
    missing = []
    if not os.access(mariadbd, os.X_OK):
        missing.append(mariadbd)
    if find_installer() is None:
        missing.append(" or ".join(INSTALLERS))
    return missing


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _port_is_free(port: int) -> bool:
    # No SO_REUSEADDR: a port with connections lingering in TIME_WAIT counts as taken.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_port() -> int:
    """A free port on 127.0.0.1 below the ephemeral range: the kernel never hands it to an
    outgoing connection, so it stays ours while the server is down for a restart."""
    lo, hi = _ephemeral_range()
    candidates = [(20000, lo - 1)] if lo > 21000 else [(hi + 1, 65535)] if hi < 64000 else []
    rng = random.Random()
    for a, b in candidates:
        for _ in range(200):
            port = rng.randint(a, b)
            if _port_is_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # last resort: the kernel's pick
        s.bind((HOST, 0))
        return s.getsockname()[1]


# The parent-death signal fires when the *thread* that started the process ends, so every
# server is started from this one long-lived thread rather than from whichever (possibly
# short-lived) thread calls start().
_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()
_live: set[PrivateMariaDB] = set()


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    global _spawner
    setpriv = shutil.which("setpriv")
    if setpriv and os.uname().sysname == "Linux":
        argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]  # execs mariadbd: same pid

    def popen() -> subprocess.Popen:
        with open(log_path, "ab") as log:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)

    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="private-mariadb")
        future = _spawner.submit(popen)
    return future.result()


@atexit.register
def _kill_leftovers() -> None:
    for db in list(_live):
        db.kill()


class PrivateMariaDB:
    """A MariaDB server of one test's own; see the module docstring."""

    def __init__(self, base_dir: os.PathLike[str] | str, *, mariadbd: str = MARIADBD,
                 template_dir: os.PathLike[str] | str | None = None, port: int | None = None,
                 startup_timeout: float = 60.0, shutdown_timeout: float = 60.0,
                 extra_args: Sequence[str] = ()) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.mariadbd = mariadbd
        #: a pristine installed data directory shared by many instances (copied, never run)
        self.template_dir = Path(template_dir).resolve() if template_dir is not None else None
        self.port = port
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self.extra_args = tuple(extra_args)
        self.datadir = self.base_dir / "data"
        self.log_path = self.base_dir / "mariadbd.log"
        self.pid_file = self.base_dir / "mariadbd.pid"
        self._socket_dir: str | None = None
        self.socket = self.base_dir / "mariadbd.sock"
        if len(os.fsencode(str(self.socket))) > _SOCKET_PATH_MAX:
            self._socket_dir = tempfile.mkdtemp(prefix="pmdb-")
            self.socket = Path(self._socket_dir) / "mariadbd.sock"
        self.process: subprocess.Popen | None = None
        #: seconds the last start() / stop() took
        self.last_start_seconds: float | None = None
        self.last_stop_seconds: float | None = None

    # ---- public ----------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return HOST

    @property
    def dsn(self) -> str:
        if self.port is None:
            raise PrivateMariaDBError("the server has no port before its first start()")
        return f"mysql://root@{HOST}:{self.port}/{DATABASE}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def connect(self, **kw) -> pymysql.connections.Connection:
        """A fresh PyMySQL connection (autocommit) to database ``test``."""
        kw.setdefault("connect_timeout", 5)
        return pymysql.connect(host=HOST, port=self.port, user="root", password="", database=DATABASE,
                               autocommit=True, **kw)

    def start(self) -> None:
        """Start the server (installing its data directory the first time) and wait until it
        answers. The port, once chosen, stays the same for every later start. No-op if running."""
        if self.running:
            return
        began = time.monotonic()
        if not self.datadir.exists():
            self._install()
        first = self.port is None
        for attempt in range(5 if first else 1):
            if first:
                self.port = pick_port()
            try:
                self._launch()
                break
            except _PortTaken:
                if not first or attempt == 4:
                    raise PrivateMariaDBError(
                        f"port {self.port} is taken by someone else\n{self.log_tail()}") from None
        self.last_start_seconds = time.monotonic() - began

    def stop(self, timeout: float | None = None) -> None:
        """Clean shutdown (SIGTERM), waiting until the process is gone; SIGKILL if it does not
        go within ``timeout`` (default: shutdown_timeout). No-op if not running."""
        proc = self.process
        if proc is None:
            return
        began = time.monotonic()
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.shutdown_timeout if timeout is None else timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(30)
                    raise PrivateMariaDBError(
                        f"mariadbd did not shut down within {timeout or self.shutdown_timeout}s;"
                        f" killed it\n{self.log_tail()}") from None
        finally:
            self._forget(proc)
        self.last_stop_seconds = time.monotonic() - began

    def kill(self) -> None:
        """SIGKILL the server (a crash: InnoDB recovers at the next start) and reap it."""
        proc = self.process
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
        finally:
            self._forget(proc)

    def restart(self) -> None:
        """stop() then start(), on the same port and data directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server (killing it if it will not stop) and delete its data; keeps the log."""
        try:
            self.stop()
        except (PrivateMariaDBError, OSError, subprocess.SubprocessError):
            self.kill()
        finally:
            shutil.rmtree(self.datadir, ignore_errors=True)
            if self._socket_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no mariadbd log)"
        return "mariadbd log (" + str(self.log_path) + "):\n" + "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> PrivateMariaDB:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PrivateMariaDB {HOST}:{self.port} {state} {self.base_dir}>"

    # ---- internals -------------------------------------------------------------------------
    def _user(self) -> str:
        return pwd.getpwuid(os.geteuid()).pw_name

    def _install(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.template_dir is None:
            self._run_installer(self.datadir)
            return
        template = self.template_dir / "data"
        if not template.exists():
            self.template_dir.mkdir(parents=True, exist_ok=True)
            staging = self.template_dir / f"data.{os.getpid()}.{threading.get_ident()}"
            shutil.rmtree(staging, ignore_errors=True)
            self._run_installer(staging)
            try:
                os.rename(staging, template)
            except OSError:  # someone else installed it first
                shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(template, self.datadir, symlinks=True)

    def _run_installer(self, datadir: Path) -> None:
        installer = find_installer()
        if installer is None:
            raise PrivateMariaDBError(f"no MariaDB installer found ({', '.join(INSTALLERS)})")
        log = self.base_dir / "install.log"
        tmpdir = datadir.parent / f"{datadir.name}.tmp"  # its own: concurrent installs collide in /tmp
        tmpdir.mkdir(parents=True, exist_ok=True)
        argv = [installer, "--no-defaults", f"--user={self._user()}", f"--datadir={datadir}",
                f"--tmpdir={tmpdir}", *INSTALL_OPTIONS]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=120, check=False)
        except subprocess.TimeoutExpired as exc:
            log.write_bytes(exc.stdout or b"")
            raise PrivateMariaDBError(f"{installer} did not finish within 120s; see {log}") from None
        log.write_bytes(done.stdout)
        if done.returncode != 0:
            shutil.rmtree(datadir, ignore_errors=True)
            tail = "\n".join(done.stdout.decode(errors="replace").splitlines()[-30:])
            raise PrivateMariaDBError(f"{' '.join(argv)} failed ({done.returncode}):\n{tail}")

    def _argv(self) -> list[str]:
        return [self.mariadbd, "--no-defaults",  # never the machine's /etc/mysql config, logs, socket
                f"--user={self._user()}", f"--datadir={self.datadir}", f"--port={self.port}",
                f"--bind-address={HOST}", f"--socket={self.socket}", f"--pid-file={self.pid_file}",
                f"--log-error={self.log_path}", f"--tmpdir={self.base_dir}",
                *SERVER_OPTIONS, *self.extra_args]

    def _launch(self) -> None:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        proc = _spawn(self._argv(), self.log_path)
        self.process = proc
        _live.add(self)
        deadline = time.monotonic() + self.startup_timeout
        last_error: BaseException | None = None
        while True:
            if proc.poll() is not None:
                self._forget(proc)
                with open(self.log_path, "rb") as f:
                    f.seek(log_offset)
                    new = f.read().decode(errors="replace")
                if "Address already in use" in new or "Bind on TCP/IP port" in new:
                    raise _PortTaken()
                raise PrivateMariaDBError(
                    f"mariadbd exited with {proc.returncode} while starting\n{self.log_tail()}")
            try:
                conn = pymysql.connect(host=HOST, port=self.port, user="root", password="", connect_timeout=1,
                                       read_timeout=2, write_timeout=2, autocommit=True)
            except pymysql.err.MySQLError as exc:
                last_error = exc
            else:
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT @@datadir")
                        datadir = cur.fetchone()[0]
                        if Path(datadir).resolve() != self.datadir:  # a stranger holds our port
                            self.kill()
                            raise PrivateMariaDBError(
                                f"port {self.port} answers for {datadir}, not {self.datadir}")
                        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{DATABASE}` CHARACTER SET utf8mb4")
                    return
                finally:
                    conn.close()
            if time.monotonic() > deadline:
                self.kill()
                raise PrivateMariaDBError(
                    f"mariadbd did not answer on {HOST}:{self.port} within {self.startup_timeout}s"
                    f" ({last_error})\n{self.log_tail()}")
            time.sleep(0.02)

    def _forget(self, proc: subprocess.Popen) -> None:
        if self.process is proc:
            self.process = None
        _live.discard(self)


class _PortTaken(Exception):
    pass


@pytest.fixture
def private_mariadb(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateMariaDB]:
    """A started private MariaDB (see PrivateMariaDB); stopped and deleted when the test ends."""
    missing = missing_tools()
    if missing:
        pytest.fail(f"a private MariaDB needs {' and '.join(missing)}: install mariadb-server")
    db = PrivateMariaDB(tmp_path / "mariadb",
                        template_dir=tmp_path_factory.getbasetemp() / "private-mariadb-template")
    try:
        try:
            db.start()
        except PrivateMariaDBError as exc:
            pytest.fail(f"cannot start a private MariaDB: {exc}")
        yield db
    finally:
        db.close()
