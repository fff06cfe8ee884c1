"""The worker's link to its servers: one session at a time, with the owner of its app.

It connects to any listed server and follows REDIRECT to the owner (coming back to the
redirecting server when a late owner does not answer), says HELLO, declares the worker's jobs,
heartbeats, and reconnects with exponential backoff and jitter when the session ends.

It also keeps the run lease's clock: the loop time at which an owning server last vouched for
this worker (an answered HELLO, or a PONG with ``lease`` true, dated from when we *sent* the
request). The instance runner reads it to decide whether it may start or go on running
instances; second-level jobs read it through the worker.

Kept apart from the runs so that neither needs the other: the link reaches the worker only
through :class:`LinkConfig` (settings it reads) and :class:`LinkHooks` (callbacks).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import socket
import ssl as ssl_module
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeAlias

import msgpack

from .models import JobSpec, spec_to_wire
from .protocol import (
    PROTOCOL_VERSION,
    Connection,
    Message,
    ProtocolError,
    RemoteError,
    parse_address,
)

log = logging.getLogger("fastjob.worker")

FATAL_REJECTS = frozenset({"bad_token", "unsupported_version", "bad_message"})


class WorkerError(Exception):
    """The worker cannot go on: rejected by the server, or a job declaration was refused."""


class Redirect(NamedTuple):
    """A REDIRECT: the owner's address, and when to come back if it does not answer."""

    address: str
    retry_in: float | None


#: How one session ended: "established" (registered, then closed), a redirect, or None (failed).
SessionOutcome: TypeAlias = str | Redirect | None
Session: TypeAlias = Callable[[str, float], Awaitable[SessionOutcome]]


class LinkConfig(Protocol):
    """The worker's settings the link reads, each time it needs one (so they are never stale)."""

    @property
    def app(self) -> str: ...
    @property
    def servers(self) -> Sequence[str]: ...
    @property
    def token(self) -> str | None: ...
    @property
    def role(self) -> str: ...
    @property
    def tags(self) -> Sequence[str]: ...
    @property
    def worker_id(self) -> str: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def ssl(self) -> ssl_module.SSLContext | None: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def reconnect_min(self) -> float: ...
    @property
    def reconnect_max(self) -> float: ...
    @property
    def max_frame(self) -> int: ...
    @property
    def declared(self) -> Mapping[str, JobSpec]: ...


@dataclass(frozen=True, slots=True)
class LinkHooks:
    """What the link calls back into the worker: callables, so that it knows nothing of runs."""

    #: every frame from the server that is not the answer to one of our requests
    on_message: Callable[[Connection, Message], None]
    #: the HELLO fields the runs and second-level jobs own: running, finished, second_level
    hello_state: Callable[[], dict[str, Any]]
    #: the running instances, reported in each PING
    load: Callable[[], int]
    #: the session is registered (HELLO answered, jobs declared), just before the worker is ready
    registered: Callable[[Connection], None]
    #: the registered session ended
    lost: Callable[[], None]


class _ClientConnection(Connection):
    """A connection to a server: every frame that is not a reply goes to ``deliver``."""

    def __init__(self, max_frame: int, deliver: Callable[[Connection, Message], None]) -> None:
        super().__init__(max_frame=max_frame)
        self._deliver = deliver

    def on_message(self, msg: Message) -> None:
        self._deliver(self, msg)


class ServerLink:
    """The worker's sessions with its servers, and what each WELCOME negotiated."""

    def __init__(self, config: LinkConfig, hooks: LinkHooks) -> None:
        self._config = config
        self._hooks = hooks
        self._server_turn = random.randrange(len(config.servers))  # see _next_server
        self.conn: Connection | None = None
        self.ready = asyncio.Event()  # set while a session is registered
        self.stopping = False  # the worker is stopping: no new session, and no new run
        self.fatal: BaseException | None = None  # why the loop gave up for good
        self.last_failure: str | None = None  # why the latest connection attempt failed, for start()'s error
        self.server_id: str | None = None
        self.heartbeat_interval = 2.0
        self.heartbeat_timeout = 10.0
        self.version = PROTOCOL_VERSION  # negotiated at WELCOME
        # with no owning server heard for this long, running instances are stopped: the server
        # then runs them again elsewhere, never at the same time (WELCOME run_lease)
        self.run_lease = 10.0
        self.frame_limit = config.max_frame  # lowered to the server's limit at WELCOME
        # The lease runs from the send time of our last PING (or HELLO) that the server answered,
        # not from when we read the answer: a worker that was frozen reads old buffered frames on
        # waking, and must not take them as a sign its server is alive now.
        self.alive_at = float("-inf")
        self._pings: dict[float, float] = {}  # PING ts (wall clock) -> loop.time() it was sent
        self.clock = ClockOffset()  # our wall clock's offset from the server's (lead fires start on its clock)
        self._loop_time: Callable[[], float] = lambda: asyncio.get_running_loop().time()  # bound by begin()

    @property
    def worker_id(self) -> str:
        return self._config.worker_id

    @property
    def connected(self) -> bool:
        return self.ready.is_set() and self.conn is not None and not self.conn.closed

    def begin(self) -> None:
        """Prepare for a run on the current loop: sessions allowed again, its clock bound once
        (the lease is checked on every DISPATCH)."""
        self.stopping = False
        self._loop_time = asyncio.get_running_loop().time

    def lease_held(self) -> bool:
        """Whether an owning server vouched for us within the run lease."""
        return self._loop_time() - self.alive_at <= self.run_lease

    def close(self) -> None:
        """Close the current connection (the loop, if still running, makes another)."""
        if self.conn is not None:
            self.conn.close()

    # ---- outgoing -----------------------------------------------------------------------------
    def send(self, kind: str, body: dict[str, Any]) -> bool:
        """Send one message on the current session; False when there is none or it was refused."""
        conn = self.conn
        if conn is None or conn.closed:
            return False
        try:
            conn.send(kind, body)
        except ProtocolError as exc:  # a frame over the limit: dropped, never fatal to the worker
            log.error("worker %s: %s frame not sent: %s", self._config.worker_id, kind, exc.message)
            return False
        return True

    def ping(self, conn: Connection) -> None:
        """PING, remembering when: the PONG renews the run lease from this send time."""
        ts = time.time()
        loop = asyncio.get_running_loop()
        self._pings = {t: at for t, at in self._pings.items() if ts - t < 2 * self.heartbeat_timeout}
        self._pings[ts] = loop.time()
        conn.send("PING", {"ts": ts, "running": self._hooks.load()})

    def on_pong(self, body: dict[str, Any]) -> bool:
        """Take a PONG; True when it renewed the run lease."""
        ts = body.get("ts")
        sent_at = self._pings.pop(ts, None) if isinstance(ts, (int, float)) else None
        server_now = body.get("now")
        if sent_at is not None and isinstance(server_now, (int, float)) and isinstance(ts, (int, float)):
            self.clock.sample(float(ts), float(server_now), time.time())
        # a server that cannot vouch for its ownership (lease false) renews nothing
        if sent_at is None or not body.get("lease", True):
            return False
        self.alive_at = max(self.alive_at, sent_at)
        return True

    async def call(self, kind: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """One API request to the app's owner; waits (bounded) for a session, and retries while
        the app moves between servers (not_owner, unavailable)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await asyncio.wait_for(self.ready.wait(), max(0.01, deadline - asyncio.get_running_loop().time()))
            conn = self.conn
            if conn is None:
                continue
            try:
                reply = await conn.request(kind, body, timeout=max(0.01, deadline - asyncio.get_running_loop().time()))
                return reply.body
            except ConnectionError:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
            except RemoteError as exc:
                if exc.code not in ("not_owner", "unavailable") or asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.1)

    # ---- the session loop ---------------------------------------------------------------------
    async def run(self, session: Session) -> None:
        """Make sessions until stopped, or until a fatal refusal (kept in ``fatal``).

        ``session`` makes one connection (normally :meth:`session`; the worker passes its own
        method so that each session's outcome can be observed)."""
        config = self._config
        loop = asyncio.get_running_loop()
        failures = 0
        target: str | None = None
        hops = 0
        # A server that redirected us to an owner whose heartbeat is late: come back to it when
        # that owner's lease runs out (it will then take the app over), not after a long backoff.
        fallback: tuple[str, float] | None = None  # (address, loop.time())
        while not self.stopping:
            address = target or self._next_server()
            target = None
            patience = config.connect_timeout
            if fallback is not None:
                patience = min(patience, max(0.2, fallback[1] - loop.time()))
            try:
                outcome = await session(address, patience)
            except WorkerError as exc:
                self.fatal = exc
                log.error("worker %s: %s", config.worker_id, exc)
                return
            except (OSError, ConnectionError, asyncio.TimeoutError, RemoteError, ProtocolError) as exc:
                self.last_failure = f"{address}: {exc or type(exc).__name__}"
                # the first failure of a streak is worth a warning; its repeats are not (every backoff)
                log.log(logging.WARNING if failures == 0 else logging.INFO,
                        "worker %s: connection to %s failed (retrying with backoff): %s", config.worker_id,
                        address, exc or type(exc).__name__)
                outcome = None
            if isinstance(outcome, Redirect) and hops < 5:
                target, hops = outcome.address, hops + 1
                if outcome.retry_in is not None:
                    fallback = (address, loop.time() + outcome.retry_in)
                continue
            if outcome == "established":
                failures = 0
            hops = 0
            if self.stopping:
                return
            if fallback is not None and outcome != "established":
                back_to, at = fallback
                fallback = None
                log.info("worker %s: the owner of app %s did not answer; back to %s in %.2fs", config.worker_id,
                         config.app, back_to, max(0.0, at - loop.time()))
                await asyncio.sleep(max(0.0, at - loop.time()))
                target = back_to
                continue
            fallback = None
            delay = min(config.reconnect_max, config.reconnect_min * (2 ** failures)) * random.uniform(0.5, 1.0)
            failures = min(failures + 1, 16)
            await asyncio.sleep(delay)

    def _next_server(self) -> str:
        """The servers in turn, from a random start: after one failed, the next try is another."""
        servers = self._config.servers
        self._server_turn = (self._server_turn + 1) % len(servers)
        return servers[self._server_turn]

    async def session(self, address: str, patience: float) -> SessionOutcome:
        """One connection: handshake, then serve until it closes. Returns how it ended.

        ``patience`` bounds the connect and the HELLO's answer."""
        config, hooks = self._config, self._hooks
        loop = asyncio.get_running_loop()
        host, port = parse_address(address)
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _ClientConnection(config.max_frame, hooks.on_message), host, port,
                                   ssl=config.ssl),
            patience)
        try:
            hello_sent_at = loop.time()
            reply = await conn.request("HELLO", self._hello_body(), timeout=patience)
            if reply.type == "REDIRECT":
                log.info("worker %s: app %s is owned by %s, following", config.worker_id, config.app,
                         reply.body["address"])
                return Redirect(reply.body["address"], reply.body.get("retry_in"))
            if reply.type == "REJECT":
                code, reason = reply.body.get("code", ""), reply.body.get("reason", "")
                if code in FATAL_REJECTS:
                    raise WorkerError(f"rejected by {address}: {code}: {reason}")
                log.warning("worker %s: %s refused the session (%s: %s); retrying",
                            config.worker_id, address, code, reason)
                return None
            self.server_id = reply.body["server_id"]
            self.version = int(reply.body["version"])
            self.heartbeat_interval = float(reply.body["heartbeat_interval"])
            self.heartbeat_timeout = float(reply.body["heartbeat_timeout"])
            self.run_lease = float(reply.body.get("run_lease") or self.heartbeat_timeout)
            self.frame_limit = min(config.max_frame, int(reply.body["max_frame"]))
            conn.watch_idle(self.heartbeat_timeout)  # a server silent this long is gone: reconnect
            self.alive_at = max(self.alive_at, hello_sent_at)
            self.conn = conn
            await self._register_jobs(conn)
            hooks.registered(conn)
            self.ready.set()
            self.ping(conn)  # measures the clock offset before the first lead fire is due
            log.info("worker %s: registered with %s for app %s", config.worker_id, self.server_id, config.app)
            await self._heartbeat_until_closed(conn)
            return "established"
        finally:
            if self.conn is conn:
                self.conn = None
                self.ready.clear()
                hooks.lost()
            conn.close()

    def _hello_body(self) -> dict[str, Any]:
        config = self._config
        return {
            "version": PROTOCOL_VERSION,
            "app": config.app,
            "worker_id": config.worker_id,
            "role": config.role,
            "token": config.token,
            "tags": config.tags,
            "capacity": config.max_concurrency,
            **self._hooks.hello_state(),  # running, finished, second_level
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    async def _register_jobs(self, conn: Connection) -> None:
        """Declare every job the worker's code defines: in batches of JOB_DECLARE (version 3), the
        last one marked final so that the server knows the complete set (a job no live worker
        declares any more is paused after a grace); one JOB_UPSERT per job to an older server."""
        specs = list(self._config.declared.values())
        if self.version < 3 or self._config.role != "worker":  # a client's jobs are API jobs
            await self._upsert_each(conn, specs)
            return
        in_flight: set[asyncio.Future[None]] = set()
        try:
            for batch, final in declaration_batches(specs, self.frame_limit):
                # the final batch, which completes the set, goes once every other one is written
                while in_flight and (final or len(in_flight) >= DECLARE_IN_FLIGHT):
                    await _first_done(in_flight)
                in_flight.add(asyncio.ensure_future(self._declare(conn, batch, final)))
                await asyncio.sleep(0)  # send it, then encode the next batch while the server works
            while in_flight:
                await _first_done(in_flight)
        finally:
            for future in in_flight:
                future.cancel()

    async def _declare(self, conn: Connection, batch: list[dict[str, Any]], final: bool) -> None:
        try:
            await conn.request("JOB_DECLARE", {"jobs": batch, "final": final},
                               timeout=max(30.0, self._config.connect_timeout))
        except RemoteError as exc:
            if exc.code == "invalid":
                raise WorkerError(f"declaration refused by the server: {exc.message}") from None
            raise

    async def _upsert_each(self, conn: Connection, specs: list[JobSpec]) -> None:
        """Protocol versions 1 and 2: one JOB_UPSERT per job, many in flight at once."""
        for start in range(0, len(specs), 256):
            chunk = specs[start:start + 256]
            replies = await asyncio.gather(
                *(conn.request("JOB_UPSERT", {"job": spec_to_wire(spec)},
                               timeout=max(30.0, self._config.connect_timeout))
                  for spec in chunk),
                return_exceptions=True)
            for spec, reply in zip(chunk, replies, strict=True):
                if isinstance(reply, RemoteError) and reply.code == "invalid":
                    raise WorkerError(f"job {spec.name!r} refused by the server: {reply.message}")
                if isinstance(reply, BaseException):
                    raise reply

    async def _heartbeat_until_closed(self, conn: Connection) -> None:
        closed = asyncio.ensure_future(conn.wait_closed())
        try:
            while not closed.done():
                # asyncio.wait, not wait_for: it never swallows a cancellation (Python < 3.12)
                await asyncio.wait({closed}, timeout=self.heartbeat_interval)
                if closed.done():
                    return
                self.ping(conn)
        finally:
            closed.cancel()


#: Jobs per JOB_DECLARE: one store transaction each on the server.
DECLARE_BATCH = 1000
#: JOB_DECLARE batches awaiting their answer at once (the server decides whether it writes them
#: at once or in turn; it answers up to 1024 requests of a connection at once).
DECLARE_IN_FLIGHT = 4


async def _first_done(futures: set[asyncio.Future[None]]) -> None:
    """Wait for one of ``futures``, take the finished ones out, raise the error of a failed one."""
    done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    futures -= done
    errors = [error for error in (f.exception() for f in done if not f.cancelled()) if error is not None]
    if errors:
        raise errors[0]


def declaration_batches(specs: list[JobSpec], frame_limit: int) -> Iterator[tuple[list[dict[str, Any]], bool]]:
    """The declarations as job maps, in batches of at most DECLARE_BATCH that each fit half a
    frame, each with "is it the last"; encoded as they are taken. There is always a batch: an
    empty final one tells the server that this worker declares nothing."""
    budget = frame_limit // 2
    batch: list[dict[str, Any]] = []
    size = 0
    for spec in specs:
        job = spec_to_wire(spec)
        job_size = len(msgpack.packb(job))
        if batch and (len(batch) >= DECLARE_BATCH or size + job_size > budget):
            yield batch, False
            batch, size = [], 0
        batch.append(job)
        size += job_size
    yield batch, True


class ClockOffset:
    """How far the server's wall clock is ahead of ours, estimated NTP-style over PING/PONG.

    Each answered PING gives offset = server_now - (sent + received) / 2, off by at most half its
    round trip; the estimate is the sample with the shortest round trip among the last few, so a
    PONG that waited behind a burst does not move it."""

    SAMPLES = 8

    def __init__(self) -> None:
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.SAMPLES)
        self.offset = 0.0  # seconds to add to our wall clock to read the server's
        self.error = float("inf")  # half the round trip of the sample in use

    def sample(self, sent: float, server_now: float, received: float) -> None:
        round_trip = received - sent
        if round_trip < 0:
            return  # our clock stepped back meanwhile: the sample means nothing
        self._samples.append((round_trip, server_now - (sent + received) / 2))
        best_round_trip, self.offset = min(self._samples)
        self.error = best_round_trip / 2

    def to_local(self, server_time: float) -> float:
        """A server wall-clock instant on our wall clock (the estimate)."""
        return server_time - self.offset

    def surely_after(self, server_time: float) -> float:
        """The first instant on our wall clock that is surely not before ``server_time`` on the server's:
        the estimate plus its error bound (half the round trip), so that a lead fire never starts early."""
        return server_time - self.offset + (self.error if self.error != float("inf") else 0.0)
