"""Every knob of a server, defined once: its default, its help, and so its ``--flag`` and its
``FASTJOB_…`` environment variable (the CLI builds its parser from these fields).

Code that runs a server in-process passes a :class:`ServerConfig`; ``check()`` names what is
inconsistent, and the CLI refuses to start on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..protocol import DEFAULT_MAX_FRAME
from ..store import DEFAULT_URL

#: The smallest frame limit a server accepts: a worker's HELLO alone may need several KiB.
MIN_MAX_FRAME = 65536


def _knob(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ServerConfig:
    """A server's settings; each field is a ``--flag`` and a ``FASTJOB_<FIELD>`` variable."""

    host: str = _knob("127.0.0.1", "address to bind")
    port: int = _knob(7700, "port to bind; 0 picks a free one")
    db: str = _knob(DEFAULT_URL, "sqlite:///path.db (default) or mysql://user:pass@host:port/db")
    advertise: str | None = _knob(None, "host:port other servers redirect workers to (default: the bound one)")
    server_id: str | None = _knob(None, "stable id (default: the advertised address)")
    log_level: str = _knob("INFO", "DEBUG, INFO, WARNING or ERROR")
    heartbeat_interval: float = _knob(2.0, "seconds between heartbeats (server to database, worker to server)")
    heartbeat_timeout: float = _knob(10.0, "a server or worker silent this long is dead; also the owner's lease")
    run_lease: float | None = _knob(None, "a worker that hears no owning server this long stops its running"
                                          " instances, which then run again elsewhere (default: the heartbeat"
                                          " timeout)")
    status_flush_interval: float = _knob(0.02, "seconds status changes gather into one batched database write")
    scan_horizon: float = _knob(5.0, "seconds ahead that fires are written to the WAL")
    scan_interval: float | None = _knob(None, "seconds between WAL scans (default: a fifth of the horizon)")
    dispatch_wait: float = _knob(30.0, "seconds a due fire waits for a worker before it is failed")
    misfire_threshold: float = _knob(5.0, "a fire later than this when claimed is a misfire")
    second_level_threshold: float = _knob(60.0, "fixed rate/delay jobs with a shorter period run on a worker")
    handshake_timeout: float = _knob(10.0, "seconds a new connection has to say HELLO")
    max_frame: int = _knob(DEFAULT_MAX_FRAME, f"largest frame accepted, in bytes (at least {MIN_MAX_FRAME})")
    tls_cert: str | None = _knob(None, "PEM certificate chain: serve TLS")
    tls_key: str | None = _knob(None, "the certificate's PEM private key")
    app_tokens: dict[str, str] = field(default_factory=dict, metadata={
        "help": "require TOKEN from workers of APP (repeatable; FASTJOB_APP_TOKENS=a=x,b=y)"})

    @property
    def effective_run_lease(self) -> float:
        return self.run_lease if self.run_lease is not None else self.heartbeat_timeout

    def check(self) -> list[str]:
        """What is inconsistent, one line each (empty: nothing)."""
        problems = []
        if self.heartbeat_timeout <= self.heartbeat_interval:
            problems.append("--heartbeat-timeout must be longer than --heartbeat-interval")
        if self.run_lease is not None and self.run_lease <= self.heartbeat_interval:
            problems.append("--run-lease must be longer than --heartbeat-interval")
        if self.max_frame < MIN_MAX_FRAME:
            problems.append(f"--max-frame must be at least {MIN_MAX_FRAME} bytes"
                            " (a worker's HELLO alone may need several KiB)")
        if not 0 < self.status_flush_interval <= 60:
            problems.append("--status-flush-interval must be in (0, 60] seconds")
        return problems
