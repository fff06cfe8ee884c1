"""The real server's session rules, over real loopback sockets.

``fastjob/server/session.py`` (``WorkerSession``: HELLO first, handshake timeout, version check,
field validation, token check, WELCOME / REDIRECT / REJECT, reports, API dispatch and the
``MAX_API_INFLIGHT`` bound) and the silent-session sweeper of ``fastjob/server/app.py``. Each
test starts an in-process :class:`FastJobServer` on 127.0.0.1, port 0, with a temporary SQLite
database, and talks to it with raw frames (``encode`` / ``Decoder`` over asyncio streams), so a
test can send anything a broken or hostile client might.

Every scenario runs once on asyncio and once on uvloop (the ``fastjob-server`` process runs on
uvloop). Every wait is an awaited read or future with a bound; nothing sleeps to synchronise.
Assertions are on frames and server state, never on log text.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

import fastjob.server.session as session_module
from fastjob.protocol import (
    DEFAULT_MAX_FRAME,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Decoder,
    ErrorCode,
    Message,
    encode,
    parse_address,
    validate,
)
from fastjob.server.app import FastJobServer, ServerConfig
from fastjob.server.session import MAX_API_INFLIGHT, WorkerSession

WAIT = 5.0  # bound of any wait for something that should happen promptly
# uvloop's clock counts whole milliseconds, so an elapsed time measured on it may read a hair
# under the delay the server's timer really waited
CLOCK_SLACK = 0.002
APP = "billing"




# ---- a raw client and a server under test -------------------------------------------------


_ABSENT = object()  # hello_body(token=_ABSENT) leaves the field out


def hello_body(**over: Any) -> dict[str, Any]:
    """A valid HELLO body with ``over`` applied."""
    body: dict[str, Any] = {"version": PROTOCOL_VERSION, "app": APP, "worker_id": "w-1"}
    body.update(over)
    return {k: v for k, v in body.items() if v is not _ABSENT}


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


class RawPeer:
    """A client that writes whatever bytes a test wants and decodes what the server answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = Decoder(DEFAULT_MAX_FRAME)
        self.inbox: collections.deque[Message] = collections.deque()
        self.sockname = writer.get_extra_info("sockname")

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, mtype: str, body: dict[str, Any], rid: int = 0) -> None:
        self.writer.write(encode(mtype, body, rid))

    async def recv(self, timeout: float = WAIT) -> Message:
        """The next frame from the server (bounded); AssertionError if it hangs up instead."""
        while not self.inbox:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise AssertionError("the server closed the connection")
            self.inbox.extend(self.decoder.feed(data))
        return self.inbox.popleft()

    async def recv_until_eof(self, timeout: float = WAIT) -> list[Message]:
        """Every frame until the server closes the connection (bounded)."""
        data = await asyncio.wait_for(self.reader.read(), timeout)  # read() returns at EOF
        msgs = list(self.inbox) + self.decoder.feed(data)
        self.inbox.clear()
        assert self.decoder.buffered == 0, "the server closed inside a frame"
        return msgs

    async def hello(self, rid: int = 1, **over: Any) -> Message:
        self.send("HELLO", hello_body(**over), rid)
        reply = await self.recv()
        assert reply.rid == rid, reply
        return reply

    async def request(self, mtype: str, body: dict[str, Any], rid: int) -> Message:
        self.send(mtype, body, rid)
        reply = await self.recv()
        assert reply.rid == rid, reply
        return reply

    async def ping(self, ts: Any = None) -> Message:
        self.send("PING", {} if ts is None else {"ts": ts})
        return await self.recv()

    def close(self) -> None:
        self.writer.close()


class Bench:
    """One running server plus the peers a test opened; everything is closed at the end."""

    def __init__(self, server: FastJobServer) -> None:
        self.server = server
        self.peers: list[RawPeer] = []

    async def connect(self) -> RawPeer:
        host, port = parse_address(self.server.address)
        reader, writer = await asyncio.open_connection(host, port)
        peer = RawPeer(reader, writer)
        self.peers.append(peer)
        return peer

    async def established(self, **over: Any) -> RawPeer:
        peer = await self.connect()
        reply = await peer.hello(**over)
        assert reply.type == "WELCOME", reply
        return peer

    def session_of(self, peer: RawPeer) -> WorkerSession | None:
        """The server's side of ``peer``'s connection, while it is open."""
        for session in self.server.connections:
            if session.peername == peer.sockname:
                return session
        return None

    async def server_side_closed(self, peer: RawPeer) -> None:
        """Wait (bounded) until the server has dropped ``peer``'s connection.

        Call it after the server has answered something on that connection: its session then
        exists, so it is either still listed in ``server.connections`` or already gone.
        """
        session = self.session_of(peer)
        if session is not None:
            await asyncio.wait_for(session.wait_closed(), WAIT)
        assert self.session_of(peer) is None

    def established_sessions(self, app: str = APP) -> list[WorkerSession]:
        return list(self.server.sessions.get(app, []))


@contextlib.asynccontextmanager
async def running_server(tmp_path: Path, **config: Any) -> AsyncIterator[Bench]:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "http_port": 0,
        "db": f"sqlite:///{tmp_path / 'x.db'}",
        "heartbeat_interval": 1.0,
        "heartbeat_timeout": 5.0,
        "handshake_timeout": 5.0,
    }
    settings.update(config)
    server = FastJobServer(ServerConfig(**settings))
    await server.start()
    bench = Bench(server)
    try:
        yield bench
    finally:
        for peer in bench.peers:
            peer.close()
        await asyncio.wait_for(server.stop(), WAIT)


def assert_pong(msg: Message, ts: Any) -> None:
    """A PONG (one-way, rid 0) echoing ``ts``; other PONG fields are not this test's business."""
    assert msg.type == "PONG" and msg.rid == 0, msg
    validate("PONG", msg.body)
    assert msg.body.get("ts") == ts and type(msg.body.get("ts")) is type(ts), msg


def assert_fatal(msgs: list[Message], code: str) -> None:
    """Exactly one frame, a fatal ERROR with ``code`` (not a reply: rid 0)."""
    assert len(msgs) == 1, msgs
    err = msgs[0]
    assert err.type == "ERROR" and err.rid == 0, err
    assert err.body["code"] == code and err.body["fatal"] is True, err
    validate("ERROR", err.body)


def assert_rejected(msgs: list[Message], rid: int, code: str) -> None:
    """Exactly one frame, a REJECT answering ``rid`` with ``code``."""
    assert len(msgs) == 1, msgs
    reject = msgs[0]
    assert reject.type == "REJECT" and reject.rid == rid, reject
    assert reject.body["code"] == code, reject
    validate("REJECT", reject.body)


# ---- before the handshake ------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        encode("PING", {"ts": 1.5}),
        encode("JOB_LIST", {}, rid=1),  # an API request before HELLO
        encode("RESULT", {"instance_id": 1, "status": "succeeded", "finished_at": 1.0}),
        encode("WELCOME", {"version": PROTOCOL_VERSION, "server_id": "x", "heartbeat_interval": 1.0,
                           "heartbeat_timeout": 5.0, "max_frame": DEFAULT_MAX_FRAME}),
    ],
    ids=["ping", "api-request", "report", "server-type"],
)
def test_first_frame_other_than_hello_is_fatal(run: Callable[..., Any], tmp_path: Path, first: bytes) -> None:
    async def main() -> None:
        async with running_server(tmp_path) as bench:
            peer = await bench.connect()
            peer.send_raw(first + encode("HELLO", hello_body(), rid=2))  # a HELLO after it is too late
            assert_fatal(await peer.recv_until_eof(), ErrorCode.BAD_MESSAGE)
            await bench.server_side_closed(peer)
            assert bench.established_sessions() == []

    run(main())


def test_hello_that_is_not_a_request_is_fatal(run: Callable[..., Any], tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(tmp_path) as bench:
            peer = await bench.connect()
            peer.send("HELLO", hello_body(), rid=0)
            assert_fatal([await peer.recv()], ErrorCode.BAD_MESSAGE)  # protocol.md section 5
            assert await peer.recv_until_eof() == []

    run(main())


@pytest.mark.parametrize("sent", [b"", encode("HELLO", hello_body(), rid=1)[:10]], ids=["silent", "partial-hello"])
def test_no_hello_within_handshake_timeout_is_fatal(run: Callable[..., Any], tmp_path: Path, sent: bytes) -> None:
    handshake_timeout = 0.3

    async def main() -> None:
        async with running_server(tmp_path, handshake_timeout=handshake_timeout) as bench:
            prompt = await bench.established()  # completed its HELLO in time
            loop = asyncio.get_running_loop()
            connected_at = loop.time()
            slow = await bench.connect()
            slow.send_raw(sent)  # bytes of a frame are not a HELLO: the timer keeps running
            assert_fatal(await slow.recv_until_eof(), ErrorCode.HANDSHAKE_TIMEOUT)
            assert loop.time() - connected_at >= handshake_timeout - CLOCK_SLACK
            await bench.server_side_closed(slow)
            # the session that said HELLO in time outlived the handshake timeout
            assert_pong(await prompt.ping(ts=3.25), 3.25)
            assert bench.session_of(prompt) in bench.established_sessions()

    run(main())


# ---- HELLO: version, fields, token, owner --------------------------------------------------


def test_version_below_the_minimum_is_rejected(run: Callable[..., Any], tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(tmp_path) as bench:
            peer = await bench.connect()
            peer.send("HELLO", hello_body(version=MIN_PROTOCOL_VERSION - 1), rid=7)
            assert_rejected(await peer.recv_until_eof(), 7, ErrorCode.UNSUPPORTED_VERSION)
            await bench.server_side_closed(peer)
            assert bench.established_sessions() == []

    run(main())


@pytest.mark.parametrize(
    "client_version",
    sorted({MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 50}),
)
def test_welcome_carries_the_lower_version_and_the_server_settings(
    run: Callable[..., Any], tmp_path: Path, client_version: int
) -> None:
    async def main() -> None:
        async with running_server(tmp_path, heartbeat_interval=0.75, heartbeat_timeout=4.5) as bench:
            peer = await bench.connect()
            welcome = await peer.hello(rid=3, version=client_version, worker_id="w-42", tags=["eu"], capacity=4)
            assert welcome.type == "WELCOME"
            validate("WELCOME", welcome.body)
            assert welcome.body["version"] == min(client_version, PROTOCOL_VERSION)
            assert welcome.body["server_id"] == bench.server.cluster.server_id
            assert welcome.body["heartbeat_interval"] == 0.75
            assert welcome.body["heartbeat_timeout"] == 4.5
            assert welcome.body["max_frame"] == bench.server.config.max_frame
            session = bench.session_of(peer)
            assert session is not None and session.established
            assert bench.established_sessions() == [session]
            assert (session.app, session.worker_id, session.role) == (APP, "w-42", "worker")
            assert session.tags == {"eu"} and session.capacity == 4 and session.accepts_jobs

    run(main())


@pytest.mark.parametrize(
    "over, accepted",
    [
        ({"app": ""}, False),
        ({"app": "a" * 129}, False),
        ({"app": "a" * 128}, True),
        ({"worker_id": ""}, False),
        ({"worker_id": "w" * 129}, False),
        ({"worker_id": "w" * 128}, True),
        ({"role": "boss"}, False),
        ({"role": ""}, False),
        ({"role": "client"}, True),
        ({"role": "worker"}, True),
    ],
    ids=["app-empty", "app-129", "app-128", "worker_id-empty", "worker_id-129", "worker_id-128",
         "role-boss", "role-empty", "role-client", "role-worker"],
)
def test_hello_fields_are_validated(
    run: Callable[..., Any], tmp_path: Path, over: dict[str, Any], accepted: bool
) -> None:
    async def main() -> None:
        async with running_server(tmp_path) as bench:
            peer = await bench.connect()
            app = over.get("app", APP)
            if accepted:
                reply = await peer.hello(rid=5, **over)
                assert reply.type == "WELCOME", reply
                session = bench.session_of(peer)
                assert session is not None and bench.established_sessions(app) == [session]
                assert session.accepts_jobs == (over.get("role", "worker") == "worker")
            else:
                peer.send("HELLO", hello_body(**over), rid=5)
                assert_rejected(await peer.recv_until_eof(), 5, ErrorCode.INVALID)
                await bench.server_side_closed(peer)
                assert bench.established_sessions(app) == []

    run(main())


def test_hello_role_nil_means_the_default_role(run: Callable[..., Any], tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(tmp_path) as bench:
            peer = await bench.connect()
            reply = await peer.hello(rid=5, role=None)
            assert reply.type == "WELCOME", reply  # nil means absent (protocol.md section 4, rule 2)
            session = bench.session_of(peer)
            assert session is not None and session.role == "worker" and session.accepts_jobs

    run(main())


TOKENS = {"secure": "s3cret"}


@pytest.mark.parametrize(
    "app, token, accepted",
    [
        ("secure", _ABSENT, False),
        ("secure", None, False),
        ("secure", "", False),
        ("secure", "wrong", False),
        ("secure", "s3cret ", False),
        ("secure", "S3CRET", False),
        ("secure", "s3cret", True),
        ("open", _ABSENT, True),  # an app without a worker token takes a HELLO without one (loopback server)
        ("open", "whatever", False),  # but a token given must be valid (version 4: tokens live in one store)
    ],
    ids=["missing", "nil", "empty", "wrong", "trailing-space", "case", "right", "open-none", "open-wrong"],
)
def test_app_token(run: Callable[..., Any], tmp_path: Path, app: str, token: Any, accepted: bool) -> None:
    async def main() -> None:
        async with running_server(tmp_path, app_tokens=TOKENS) as bench:
            peer = await bench.connect()
            if accepted:
                assert (await peer.hello(rid=9, app=app, token=token)).type == "WELCOME"
                assert len(bench.established_sessions(app)) == 1
            else:
                peer.send("HELLO", hello_body(app=app, token=token), rid=9)
                assert_rejected(await peer.recv_until_eof(), 9, ErrorCode.BAD_TOKEN)
                await bench.server_side_closed(peer)
                assert bench.established_sessions(app) == []

    run(main())


def test_hello_for_an_app_owned_elsewhere_is_redirected(run: Callable[..., Any], tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(tmp_path) as owner:
            await owner.established()  # the owner claims APP
            async with running_server(tmp_path) as other:  # same database, another server
                assert other.server.address != owner.server.address
                peer = await other.connect()
                peer.send("HELLO", hello_body(), rid=4)
                msgs = await peer.recv_until_eof()
                assert [(m.type, m.rid) for m in msgs] == [("REDIRECT", 4)], msgs
                validate("REDIRECT", msgs[0].body)
                assert msgs[0].body["address"] == owner.server.address
                await other.server_side_closed(peer)
                assert other.established_sessions() == []
                # the redirected worker is welcome at the owner
                assert (await (await owner.connect()).hello(worker_id="w-2")).type == "WELCOME"

    run(main())


# ---- on an established session -------------------------------------------------------------


@pytest.mark.parametrize(
    "second",
    [
        encode("HELLO", hello_body(), rid=2),
        encode("HELLO", hello_body(), rid=0),
        encode("DISPATCH", {"instance_id": 1, "job_id": 1, "job": "j", "handler": "h", "params": None,
                            "attempt": 1, "scheduled_at": 1.0, "timeout": None}),
        encode("CANCEL", {"instance_id": 1}),
        encode("WELCOME", {"version": PROTOCOL_VERSION, "server_id": "x", "heartbeat_interval": 1.0,
                           "heartbeat_timeout": 5.0, "max_frame": DEFAULT_MAX_FRAME}),
    ],
    ids=["hello", "hello-rid0", "dispatch", "cancel", "welcome"],
)
def test_second_hello_or_server_type_on_established_session_is_fatal(
    run: Callable[..., Any], tmp_path: Path, second: bytes
) -> None:
    async def main() -> None:
        async with running_server(tmp_path) as bench:
            peer = await bench.established()
            assert len(bench.established_sessions()) == 1
            peer.send_raw(second)
            assert_fatal(await peer.recv_until_eof(), ErrorCode.BAD_MESSAGE)
            await bench.server_side_closed(peer)
            assert bench.established_sessions() == []

    run(main())


def test_second_hello_while_the_first_is_pending_is_fatal(run: Callable[..., Any], tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(tmp_path) as bench:
            peer = await bench.connect()
            peer.send_raw(encode("HELLO", hello_body(), rid=1) + encode("HELLO", hello_body(), rid=2))
            assert_fatal(await peer.recv_until_eof(), ErrorCode.BAD_MESSAGE)  # and no WELCOME
            await bench.server_side_closed(peer)
            assert bench.established_sessions() == []

    run(main())


def test_silent_session_is_closed_after_heartbeat_timeout(run: Callable[..., Any], tmp_path: Path) -> None:
    interval, timeout = 0.1, 0.5

    async def main() -> None:
        async with running_server(tmp_path, heartbeat_interval=interval, heartbeat_timeout=timeout) as bench:
            loop = asyncio.get_running_loop()
            live = await bench.established(worker_id="live")
            silent = await bench.connect()
            hello_sent_at = loop.time()
            assert (await silent.hello(worker_id="silent")).type == "WELCOME"
            silent_session = bench.session_of(silent)
            assert len(bench.established_sessions()) == 2
            closed = asyncio.ensure_future(silent.recv_until_eof(timeout=timeout + WAIT))

            # the live worker heartbeats as a worker does, until the silent one is dropped
            pings = 0
            while not closed.done():
                pong = await live.ping(ts=float(pings))
                assert_pong(pong, float(pings))
                pings += 1
                await asyncio.wait({closed}, timeout=interval)  # the heartbeat cadence, or the close
            assert_fatal(closed.result(), ErrorCode.HEARTBEAT_TIMEOUT)
            assert loop.time() - hello_sent_at >= timeout - CLOCK_SLACK  # not before the timeout
            await bench.server_side_closed(silent)
            assert silent_session is not None and silent_session not in bench.established_sessions()
            # the worker that kept talking is untouched
            assert [s.worker_id for s in bench.established_sessions()] == ["live"]
            assert_pong(await live.ping(ts=99.5), 99.5)

    run(main())


def test_ping_is_answered_with_pong_echoing_ts(run: Callable[..., Any], tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(tmp_path) as bench:
            peer = await bench.established()
            now = time.time()
            for ts in (now, 0.0, 1700000000.123456, 5):
                assert_pong(await peer.ping(ts=ts), ts)
            peer.send("PING", {"ts": 2.5, "running": 3})  # the load field does not change the answer
            assert_pong(await peer.recv(), 2.5)
            pong = await peer.ping()  # no ts: still answered
            assert pong.type == "PONG" and pong.rid == 0
            validate("PONG", pong.body)
            # pipelined PINGs are answered in order
            peer.send_raw(b"".join(encode("PING", {"ts": float(i)}) for i in range(20)))
            assert [(await peer.recv()).body["ts"] for _ in range(20)] == [float(i) for i in range(20)]

    run(main())


HELLO_FRAME = encode("HELLO", hello_body(), rid=1)


@pytest.mark.parametrize("stage", ["before-hello", "after-welcome"])
@pytest.mark.parametrize(
    "data, eof, code",
    [
        (b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", False, ErrorCode.BAD_FRAME),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, ErrorCode.FRAME_TOO_LARGE),
        (b"\xff\xff\xff\xff", False, ErrorCode.FRAME_TOO_LARGE),
        (b"\x00\x00\x00\x00", False, ErrorCode.BAD_FRAME),
        (HELLO_FRAME[:20], True, ErrorCode.BAD_FRAME),  # a truncated frame, then EOF
        (frame(msgpack.packb({"type": "HELLO"})), False, ErrorCode.BAD_MESSAGE),
        (frame(msgpack.packb(["HELLO", 1, {"version": PROTOCOL_VERSION}])), False, ErrorCode.BAD_MESSAGE),
        (frame(msgpack.packb(["PING", 0, {"ts": "now"}])), False, ErrorCode.BAD_MESSAGE),
        (encode("NOT_A_TYPE", {}, rid=1), False, ErrorCode.UNKNOWN_TYPE),
    ],
    ids=["garbage", "http", "oversized", "zero", "truncated", "shape", "fields", "ping-ts", "unknown"],
)
def test_malformed_frame_drops_that_client_only(
    run: Callable[..., Any], tmp_path: Path, data: bytes, eof: bool, code: str, stage: str
) -> None:
    async def main() -> None:
        async with running_server(tmp_path) as bench:
            good = await bench.established(worker_id="good")
            if stage == "after-welcome":
                bad = await bench.established(worker_id="bad")
                assert len(bench.established_sessions()) == 2
            else:
                bad = await bench.connect()
            bad.send_raw(data)
            if eof:
                bad.writer.write_eof()
            assert_fatal(await bad.recv_until_eof(), code)
            await bench.server_side_closed(bad)
            # the well-behaved client on the same server carries on
            assert [s.worker_id for s in bench.established_sessions()] == ["good"]
            assert_pong(await good.ping(ts=1.25), 1.25)
            reply = await good.request("JOB_LIST", {}, rid=2)
            assert reply == Message("RESPONSE", 2, {"jobs": []})

    run(main())


# ---- reports and the client API ------------------------------------------------------------


def test_reports_are_taken_and_api_calls_answered(run: Callable[..., Any], tmp_path: Path) -> None:
    job = {"name": "nightly", "handler": "app.nightly", "schedule_type": "api"}

    async def main() -> None:
        async with running_server(tmp_path) as bench:
            peer = await bench.established()
            # reports about instances this session does not run are ignored, never fatal
            peer.send("ACK", {"instance_id": 999, "accepted": True})
            peer.send("START", {"instance_id": 999, "started_at": 1.0})
            peer.send("LOG", {"instance_id": 999, "lines": [[1.0, "INFO", "x"]]})
            peer.send("RESULT", {"instance_id": 999, "status": "succeeded", "finished_at": 2.0})
            peer.send("SL_REPORT", {"reports": []})
            peer.send("ERROR", {"code": ErrorCode.INTERNAL, "message": "a worker's complaint"})
            assert_pong(await peer.ping(ts=1.0), 1.0)  # nothing came before it
            # API calls run in the session's app and are answered with the request's rid
            upserted = await peer.request("JOB_UPSERT", {"job": job}, rid=11)
            assert upserted.type == "RESPONSE" and upserted.body["job"]["name"] == "nightly"
            assert upserted.body["job"]["app"] == APP
            got = await peer.request("JOB_GET", {"name": "nightly"}, rid=12)
            assert got.type == "RESPONSE" and got.body["job"]["id"] == upserted.body["job"]["id"]
            # errors of API calls are not fatal
            missing = await peer.request("JOB_GET", {"name": "missing"}, rid=13)
            assert missing.type == "ERROR" and missing.body["code"] == ErrorCode.NOT_FOUND
            assert not missing.body.get("fatal")
            bad = await peer.request("JOB_UPSERT", {"job": dict(job, schedule_type="sometimes")}, rid=14)
            assert bad.type == "ERROR" and bad.body["code"] == ErrorCode.INVALID
            # another app's client sees only its own app
            other = await bench.established(app="other", worker_id="c-1", role="client")
            assert await other.request("JOB_LIST", {}, rid=1) == Message("RESPONSE", 1, {"jobs": []})
            listed = await peer.request("JOB_LIST", {}, rid=15)
            assert [j["name"] for j in listed.body["jobs"]] == ["nightly"]

    run(main())


def test_api_requests_beyond_max_inflight_are_answered_busy(
    run: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_handle_api = session_module.handle_api
    gate: dict[str, asyncio.Event] = {}

    async def gated_handle_api(*args: Any) -> Any:
        await gate["open"].wait()  # hold every call in progress until the test opens the gate
        return await real_handle_api(*args)

    monkeypatch.setattr(session_module, "handle_api", gated_handle_api)

    async def main() -> None:
        gate["open"] = asyncio.Event()
        async with running_server(tmp_path) as bench:
            peer = await bench.established()
            n = MAX_API_INFLIGHT
            peer.send_raw(b"".join(encode("JOB_GET", {"name": "missing"}, rid=rid) for rid in range(1, n + 1)))
            extra = await peer.request("JOB_LIST", {}, rid=n + 1)  # all n are still in progress
            assert extra.type == "ERROR" and extra.body["code"] == ErrorCode.BUSY
            assert not extra.body.get("fatal")
            assert bench.session_of(peer) in bench.established_sessions()
            gate["open"].set()
            answered = [await peer.recv() for _ in range(n)]
            assert sorted(m.rid for m in answered) == list(range(1, n + 1))
            assert {(m.type, m.body["code"]) for m in answered} == {("ERROR", ErrorCode.NOT_FOUND)}
            # every finished call gave its slot back: a full window again, and no busy answer
            peer.send_raw(b"".join(encode("JOB_LIST", {}, rid=rid) for rid in range(1, n + 1)))
            answered = [await peer.recv() for _ in range(n)]
            assert {m.type for m in answered} == {"RESPONSE"}

    run(main())


def test_a_worker_token_declares_and_triggers_but_deletes_nothing(run: Callable[..., Any], tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(tmp_path, app_tokens=TOKENS) as bench:
            worker = await bench.established(app="secure", token="s3cret")
            job = {"name": "j", "handler": "h", "schedule_type": "api"}
            declared = await worker.request("JOB_DECLARE", {"jobs": [job], "final": True}, rid=2)
            assert declared.type == "RESPONSE", declared
            for rid, (kind, body) in enumerate([("JOB_DELETE", {"name": "j"}), ("JOB_UPSERT", {"job": job}),
                                                ("JOB_ENABLE", {"name": "j", "enabled": False})], start=4):
                refused = await worker.request(kind, body, rid=rid)
                assert refused.type == "ERROR" and refused.body["code"] == ErrorCode.FORBIDDEN, refused
            assert (await worker.request("JOB_GET", {"name": "j"}, rid=9)).body["job"]["enabled"] is True
            as_client = await bench.established(app="secure", token="s3cret", role="client", worker_id="wc")
            assert (await as_client.request("TRIGGER", {"name": "j"}, rid=2)).type == "RESPONSE"
            viewer, _ = await bench.server.auth.create("v", "viewer", ["secure"])
            client = await bench.established(app="secure", token=viewer, role="client", worker_id="c")
            refused = await client.request("TRIGGER", {"name": "j"}, rid=2)
            assert refused.body["code"] == ErrorCode.FORBIDDEN
            peer = await bench.connect()  # a viewer token is no worker's
            peer.send("HELLO", hello_body(app="secure", token=viewer, worker_id="w9"), rid=3)
            assert_rejected(await peer.recv_until_eof(), 3, ErrorCode.BAD_TOKEN)
            await bench.server.audit.flush()
            entries = await bench.server.store.list_audit(app="secure")
            assert ("job.delete", "forbidden") not in {(e.action, e.outcome) for e in entries}  # refused before
            assert {(e.action, e.outcome, e.via) for e in entries} >= {("job.trigger", "ok", "wire")}

    run(main())


def test_a_server_on_a_public_address_requires_a_token_for_every_app(run: Callable[..., Any], tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(tmp_path) as bench:
            bench.server.config.host = "192.0.2.1"  # as if bound there (the test binds loopback only)
            peer = await bench.connect()
            peer.send("HELLO", hello_body(app="open"), rid=1)
            assert_rejected(await peer.recv_until_eof(), 1, ErrorCode.BAD_TOKEN)
            bench.server.config.insecure = True
            await bench.established(app="open")

    run(main())
