"""Every knob of a server, defined once: its default, its help, and so its ``--flag`` and its
``FASTJOB_…`` environment variable (the CLI builds its parser from these fields).

Code that runs a server in-process passes a :class:`ServerConfig`; ``check()`` names what is
inconsistent, and the CLI refuses to start on it.
"""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any

from ..protocol import DEFAULT_MAX_FRAME
from ..store import DEFAULT_URL, create_store
from .alarms import Webhook
from .logfmt import LOG_FORMATS
from .retention import RetentionPolicy

#: The smallest frame limit a server accepts: a worker's HELLO alone may need several KiB.
MIN_MAX_FRAME = 65536
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Durations that must be positive, and those that may be zero (None: the knob is unset).
_POSITIVE = ("heartbeat_interval", "heartbeat_timeout", "run_lease", "scan_horizon", "scan_interval",
             "dispatch_wait", "handshake_timeout")
_NOT_NEGATIVE = ("lead_time", "misfire_threshold", "second_level_threshold", "undeclared_grace")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds of ``30s``, ``2m``, ``12h``, ``7d`` or a plain number of seconds; 0 means never."""
    raw = text.strip()
    unit = _UNITS.get(raw[-1:].lower(), 0)
    try:
        seconds = float(raw[:-1]) * unit if unit else float(raw)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration like 30s, 2m, 12h or 7d") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{text!r} is not a duration like 30s, 2m, 12h or 7d")
    return seconds


def is_loopback(host: str) -> bool:
    """Is ``host`` reachable only from this machine?"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    log_format: str = _knob("text", "text, or json: one JSON object per line with server, app, job and instance")
    heartbeat_interval: float = _knob(2.0, "seconds between heartbeats (server to database, worker to server)")
    heartbeat_timeout: float = _knob(10.0, "a server or worker silent this long is dead; also the owner's lease")
    run_lease: float | None = _knob(None, "a worker that hears no owning server this long stops its running"
                                          " instances, which then run again elsewhere (default: the heartbeat"
                                          " timeout)")
    status_flush_interval: float = _knob(0.02, "seconds status changes gather into one batched database write")
    scan_horizon: float = _knob(5.0, "seconds ahead that fires are written to the WAL")
    lead_time: float = _knob(1.0, "seconds before its planned time a fire goes to its worker (version 5), whose"
                                  " own timer starts it on time; at most half the scan horizon (0: each fire is"
                                  " sent when due)")
    scan_interval: float | None = _knob(None, "seconds between WAL scans (default: a fifth of the horizon)")
    dispatch_wait: float = _knob(30.0, "seconds a due fire waits for a worker before it is failed")
    misfire_threshold: float = _knob(5.0, "a fire later than this when claimed is a misfire")
    second_level_threshold: float = _knob(3.0, "fixed rate/delay jobs with a shorter period run on a worker (no"
                                               " instance rows: a run history and counters instead); 0: none")
    undeclared_grace: float = _knob(300.0, "a job declared in code that no live worker of its app declares for"
                                           " this long is paused; 0: never")
    handshake_timeout: float = _knob(10.0, "seconds a new connection has to say HELLO")
    max_frame: int = _knob(DEFAULT_MAX_FRAME, f"largest frame accepted, in bytes (at least {MIN_MAX_FRAME})")
    tls_cert: str | None = _knob(None, "PEM certificate chain: serve TLS")
    tls_key: str | None = _knob(None, "the certificate's PEM private key")
    http_port: int = _knob(7701, "port of the HTTP admin API; 0 picks a free one; -1 serves none")
    http_host: str | None = _knob(None, "address the HTTP admin API binds (default: --host)")
    http_advertise: str | None = _knob(None, "host:port other servers forward admin requests to (default: the"
                                             " bound one)")
    insecure: bool = _knob(False, "let workers of a server bound to a non-loopback address connect without a"
                                  " token")
    retain_instances: str = _knob("7d", "finished instances older than this are pruned (like 2m, 12h, 7d; 0: never)")
    retain_logs: str = _knob("3d", "log lines older than this are pruned (0: never)")
    retain_audit: str = _knob("90d", "audit log and ownership history entries older than this are pruned (0: never)")
    metrics_public: bool = _knob(False, "serve /metrics without a token to every client (default: loopback only)")
    app_tokens: dict[str, str] = field(default_factory=dict, metadata={
        "help": "require TOKEN from workers of APP (repeatable; FASTJOB_APP_TOKENS=a=x,b=y)"})
    alarm_webhooks: list[str] = field(default_factory=list, metadata={
        "help": "post alarms to URL (repeatable; slack=URL for a Slack-style incoming webhook;"
                " FASTJOB_ALARM_WEBHOOKS=url1,url2)"})
    retain_app: dict[str, str] = field(default_factory=dict, metadata={
        "help": "keep APP's finished instances this long instead of --retain-instances (repeatable;"
                " FASTJOB_RETAIN_APP=a=1d,b=30d)"})

    @property
    def retention(self) -> RetentionPolicy:
        return RetentionPolicy(parse_duration(self.retain_instances), parse_duration(self.retain_logs),
                               parse_duration(self.retain_audit),
                               {app: parse_duration(keep) for app, keep in self.retain_app.items()})

    @property
    def tokens_required(self) -> bool:
        """Must every wire peer present a token? On a non-loopback address, unless --insecure."""
        return not self.insecure and not is_loopback(self.host)

    @property
    def effective_http_host(self) -> str:
        return self.http_host or self.host

    @property
    def effective_lead_time(self) -> float:
        """The lead time in use: a fire can go ahead only once it is written, so at most half the horizon."""
        return min(self.lead_time, self.scan_horizon / 2)

    @property
    def effective_run_lease(self) -> float:
        return self.run_lease if self.run_lease is not None else self.heartbeat_timeout

    def check(self) -> list[str]:
        """What is out of range or inconsistent, one line each naming the flag (empty: nothing)."""
        problems = self._ranges()
        if problems:
            return problems  # the checks below compare values that must first be numbers in range
        if self.heartbeat_timeout <= self.heartbeat_interval:
            problems.append("--heartbeat-timeout must be longer than --heartbeat-interval")
        if self.run_lease is not None and self.run_lease <= self.heartbeat_interval:
            problems.append("--run-lease must be longer than --heartbeat-interval")
        if self.max_frame < MIN_MAX_FRAME:
            problems.append(f"--max-frame must be at least {MIN_MAX_FRAME} bytes"
                            " (a worker's HELLO alone may need several KiB)")
        if not 0 < self.status_flush_interval <= 60:
            problems.append("--status-flush-interval must be in (0, 60] seconds")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("--tls-cert and --tls-key go together")
        try:
            create_store(self.db)  # builds, does not connect: the URL's form and its driver
        except ValueError as exc:
            problems.append(f"--db: {exc}")
        return problems

    def _ranges(self) -> list[str]:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be in 0-65535, got {self.port}")
        if not -1 <= self.http_port <= 65535:
            problems.append(f"--http-port must be in 0-65535 (or -1: none), got {self.http_port}")
        for flag, value in [("retain-instances", self.retain_instances), ("retain-logs", self.retain_logs),
                            ("retain-audit", self.retain_audit),
                            *((f"retain-app {app}", keep) for app, keep in self.retain_app.items())]:
            try:
                parse_duration(value)
            except ValueError as exc:
                problems.append(f"--{flag}: {exc}")
        for hook in self.alarm_webhooks:
            try:
                Webhook.parse(hook)
            except ValueError as exc:
                problems.append(str(exc))
        if self.log_format not in LOG_FORMATS:
            problems.append(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            problems.append(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        for name in _POSITIVE + _NOT_NEGATIVE:
            value = getattr(self, name)
            if value is None or (math.isfinite(value) and (value > 0 or (value == 0 and name in _NOT_NEGATIVE))):
                continue
            want = "a positive number of seconds" if name in _POSITIVE else "zero or more seconds"
            problems.append(f"--{name.replace('_', '-')} must be {want}, got {value:g}")
        return problems
