"""Wire protocol tests: framing, validation, the Connection base over real loopback sockets.

Every socket scenario runs once per event loop implementation (asyncio and uvloop). Tests are
plain functions driving a fresh loop through the ``run`` fixture, which also bounds each
scenario with a timeout; synchronisation is by futures and queues, never by sleeping.

The socket tests here pair a client Connection with ``EchoPeer``, a test double of the
Connection base. The server's session rules (handshake, versions, tokens, heartbeats) are
tested against the real server in tests/test_session.py, TLS of the real server and worker in
tests/test_tls.py.
"""
from __future__ import annotations

import asyncio
import os
import re
import ssl
import struct
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import msgpack
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from fastjob.protocol import (
    DEFAULT_MAX_FRAME,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    REPLY_TYPES,
    SCHEMAS,
    STRUCTS,
    Connection,
    Decoder,
    ErrorCode,
    Message,
    ProtocolError,
    RemoteError,
    encode,
    negotiate_version,
    parse_address,
    validate,
)

# ---- one valid body per message type ------------------------------------------------------

SL_JOB = {
    "id": 7,
    "name": "tick",
    "handler": "app.tick",
    "schedule_type": "fixed_rate",
    "period": 1,  # an int where a float is expected is fine
    "params": {"x": [1, 2]},
    "timeout": None,
    "allow_overlap": False,
    "version": 3,
    "anchor": 1700000000.0,
    "last_run_at": None,
}
SL_REPORT_ITEM = {
    "job_id": 7,
    "runs": 60,
    "failures": 1,
    "last_error": "boom",
    "last_run_at": 1700000000.25,
    "lateness_p50": 0.001,
    "lateness_p99": 0.004,
    "lateness_max": 0.02,
    "since": 1699999000.5,
    "sampled": [{"planned_at": 1700000000, "started_at": 1700000000.01, "duration": 0.5, "status": "failed",
                 "error": "boom", "logs": [[1700000000.2, "ERROR", "boom"]]}],
    "logs_dropped": 0,
}
JOB_DEF = {
    "name": "nightly",
    "handler": "app.nightly",
    "schedule_type": "cron",
    "schedule_expr": "0 3 * * *",
    "timezone": "Europe/Paris",
    "params": None,
    "timeout": 60.0,
    "retry_times": 2,
    "retry_backoff": 5,
    "misfire_policy": "skip",
    "tags": ["gpu"],
    "routing": "least_busy",
    "run_once": False,
    "enabled": True,
    "overlap": "buffer_one",
    "catch_up_window": 600,
    "max_queued": 10,
    "allow_overlap": False,
}
DISPATCH_BODY = {
    "instance_id": 123456789,
    "job_id": 42,
    "job": "send-report",
    "handler": "reports.send_daily",
    "params": {"region": "eu", "limit": 100},
    "attempt": 1,
    "scheduled_at": 1700000000.0,
    "timeout": 30.0,
}
SAMPLES: dict[str, dict[str, Any]] = {
    "HELLO": {
        "version": PROTOCOL_VERSION,
        "app": "billing",
        "worker_id": "w-1",
        "role": "worker",
        "token": None,
        "tags": ["eu", "gpu"],
        "capacity": 8,
        "running": [1, 2],
        "second_level": [7],
        "host": "box-1",
        "pid": 4242,
    },
    "WELCOME": {
        "version": 1,
        "server_id": "s-1",
        "heartbeat_interval": 5.0,
        "heartbeat_timeout": 15,
        "max_frame": DEFAULT_MAX_FRAME,
        "run_lease": 15,
    },
    "REDIRECT": {"address": "10.0.0.2:7070", "server_id": "s-2", "retry_in": 1.25},
    "REJECT": {"code": ErrorCode.BAD_TOKEN, "reason": "token does not match"},
    "PING": {"ts": 1700000000.5, "running": 3},
    "PONG": {"ts": 1700000000.5, "lease": True},
    "DRAIN": {"reason": "worker stopping"},
    "DISPATCH": DISPATCH_BODY,
    "ACK": {"instance_id": 1, "accepted": False, "reason": "at capacity"},
    "HELD": {"instance_ids": [1, 2, 3]},
    "START": {"instance_id": 1, "started_at": 1700000001.0},
    "LOG": {"instance_id": 1, "lines": [[1700000001.0, "INFO", "hello"], [1700000002, "ERROR", "x"]]},
    "RESULT": {
        "instance_id": 1,
        "status": "succeeded",
        "result": {"rows": 10},
        "error": None,
        "started_at": 1700000001.0,
        "finished_at": 1700000003.5,
    },
    "CANCEL": {"instance_id": 1, "reason": "user request"},
    "SL_ASSIGN": {"job": SL_JOB, "lease": 15.0},
    "SL_REVOKE": {"job_id": 7, "reason": "rebalance"},
    "SL_REPORT": {"reports": [SL_REPORT_ITEM, dict(SL_REPORT_ITEM, last_error=None, last_run_at=None)]},
    "TASKS": {"parent": "12:1700000000000", "call": 1, "start": 256, "handler": "square", "items": [1, {"x": 2}],
              "attempt": 1, "retries": 2, "timeout": None, "job": "extract", "upstream": {"a": [1]}},
    "BROADCAST": {"parent": "12:1700000000000", "call": 2, "handler": "sync", "params": {"day": 1}, "tags": ["eu"],
                  "attempt": 1, "timeout": 30.0},
    "PARK": {"parent": "12:1700000000000", "waiting": True},
    "RUN_TASKS": {"key": "12:1700000000000|1|256", "handler": "square", "items": [1, 2], "start": 256, "attempt": 1,
                  "retries": 0, "timeout": 5, "only": [1], "shard": [0, 3], "upstream": {}, "job": "extract"},
    "TASKS_DONE": {"key": "12:1700000000000|1|256", "results": [1, None], "errors": [[1, "ValueError: x"]],
                   "logs": [[1700000001.0, "INFO", "hello"]]},
    "TASKS_ABANDON": {"parent": "12:1700000000000", "reason": "timeout"},
    "TASKS_STOP": {"key": "12:1700000000000|1|256", "reason": "timeout"},
    "TASK_RESULTS": {"parent": "12:1700000000000", "call": 1, "start": 256, "results": [1, None],
                     "errors": [[1, "ValueError: x"]]},
    "JOB_UPSERT": {"job": JOB_DEF},
    "JOB_DECLARE": {"jobs": [JOB_DEF], "final": True},
    "JOB_DELETE": {"name": "nightly"},
    "JOB_ENABLE": {"name": "nightly", "enabled": False},
    "JOB_GET": {"name": "nightly"},
    "JOB_LIST": {},
    "TRIGGER": {"name": "nightly", "params": [1, "two", 3.0]},
    "INSTANCE_GET": {"instance_id": 9},
    "INSTANCE_LIST": {"job": "nightly", "status": ["failed", "timed_out"], "limit": 50},
    "LOG_GET": {"instance_id": 9, "limit": 100},
    "RUN_LIST": {"job": "tick", "limit": 10},
    "RESPONSE": {"anything": [1, 2, {"goes": True}]},
    "ERROR": {"code": ErrorCode.NOT_FOUND, "message": "no such job", "fatal": False},
}


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


# ---- pure encode / decode -------------------------------------------------------------------


def test_samples_cover_every_type() -> None:
    assert set(SAMPLES) == set(SCHEMAS)


@pytest.mark.parametrize("mtype", sorted(SCHEMAS))
def test_round_trip_every_type(mtype: str) -> None:
    body = SAMPLES[mtype]
    validate(mtype, body)
    data = encode(mtype, body, rid=5)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert Decoder().feed(data) == [Message(mtype, 5, body)]


@pytest.mark.parametrize("mtype", sorted(t for t, f in SCHEMAS.items() if f))
def test_minimal_bodies_and_missing_required(mtype: str) -> None:
    """Only the required fields decode; dropping any one of them is BAD_MESSAGE."""
    required = {k: v for k, v in SAMPLES[mtype].items() if not SCHEMAS[mtype][k].endswith("?")}
    validate(mtype, required)
    for name in required:
        partial = {k: v for k, v in required.items() if k != name}
        with pytest.raises(ProtocolError) as info:
            Decoder().feed(encode(mtype, partial))
        assert info.value.code == ErrorCode.BAD_MESSAGE
        assert name in info.value.message


def test_field_types() -> None:
    d = dict(DISPATCH_BODY, scheduled_at=5, extra_future_field={"x": 1})  # int as float, unknown field
    assert Decoder().feed(encode("DISPATCH", d))[0].body["scheduled_at"] == 5
    bad_values = [
        ("DISPATCH", dict(DISPATCH_BODY, instance_id=True)),  # bool is not int
        ("DISPATCH", dict(DISPATCH_BODY, scheduled_at="soon")),
        ("DISPATCH", dict(DISPATCH_BODY, instance_id=1.0)),  # float is not int
        ("ACK", {"instance_id": 1, "accepted": 1}),  # int is not bool
        ("HELLO", dict(SAMPLES["HELLO"], tags=["ok", 3])),
        ("LOG", {"instance_id": 1, "lines": [[1.0, "INFO"]]}),
        ("LOG", {"instance_id": 1, "lines": [[1.0, "INFO", 5]]}),
        ("SL_ASSIGN", {"job": dict(SL_JOB, period=None), "lease": 1.0}),
        ("SL_REPORT", {"reports": [dict(SL_REPORT_ITEM, runs="many")]}),
        ("JOB_UPSERT", {"job": {"name": "x", "handler": "y"}}),
        ("ERROR", {"code": "x"}),
    ]
    for mtype, body in bad_values:
        with pytest.raises(ProtocolError) as info:
            Decoder().feed(encode(mtype, body))
        assert info.value.code == ErrorCode.BAD_MESSAGE, (mtype, body)
    # optional fields may be nil, which means absent
    validate("ACK", {"instance_id": 1, "accepted": True, "reason": None})


def test_many_frames_per_feed_and_byte_by_byte() -> None:
    stream = b"".join(encode(t, SAMPLES[t], rid=i) for i, t in enumerate(sorted(SAMPLES)))
    expected = [Message(t, i, SAMPLES[t]) for i, t in enumerate(sorted(SAMPLES))]
    assert Decoder().feed(stream) == expected
    dec = Decoder()
    got: list[Message] = []
    for i in range(len(stream)):
        got += dec.feed(stream[i : i + 1])
        assert dec.buffered <= DEFAULT_MAX_FRAME + 4
    assert got == expected
    assert dec.buffered == 0


@pytest.mark.parametrize(
    "data, code",
    [
        (b"\x00\x00\x00\x00", ErrorCode.BAD_FRAME),
        (struct.pack(">I", DEFAULT_MAX_FRAME + 1), ErrorCode.FRAME_TOO_LARGE),
        (b"GET / HTTP/1.1\r\n\r\n", ErrorCode.FRAME_TOO_LARGE),
        (frame(b"\xc1"), ErrorCode.BAD_FRAME),  # 0xc1 is never used by msgpack
        (frame(msgpack.packb(["PING", 0, {}]) + b"\x00"), ErrorCode.BAD_FRAME),  # two values
        (frame(msgpack.packb({"type": "PING"})), ErrorCode.BAD_MESSAGE),
        (frame(msgpack.packb(["PING", 0])), ErrorCode.BAD_MESSAGE),
        (frame(msgpack.packb(["PING", -1, {}])), ErrorCode.BAD_MESSAGE),
        (frame(msgpack.packb(["PING", 0, []])), ErrorCode.BAD_MESSAGE),
        (frame(msgpack.packb([1, 0, {}])), ErrorCode.BAD_MESSAGE),
        (frame(msgpack.packb(["NOPE", 0, {}])), ErrorCode.UNKNOWN_TYPE),
    ],
)
def test_decoder_errors(data: bytes, code: str) -> None:
    dec = Decoder()
    with pytest.raises(ProtocolError) as info:
        dec.feed(data)
    assert info.value.code == code
    with pytest.raises(ProtocolError):  # a failed decoder stays failed
        dec.feed(encode("PING", {}))


def test_oversized_length_is_detected_from_the_header_alone() -> None:
    dec = Decoder(max_frame=100)
    with pytest.raises(ProtocolError) as info:
        dec.feed(struct.pack(">I", 101))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    dec = Decoder(max_frame=100)
    assert dec.feed(struct.pack(">I", 100) + b"\x93") == []
    assert dec.buffered == 5


def test_helpers() -> None:
    assert parse_address("127.0.0.1:7070") == ("127.0.0.1", 7070)
    assert parse_address("[::1]:80") == ("::1", 80)
    assert parse_address("sched-1.example:1") == ("sched-1.example", 1)
    for bad in ("nohost", ":80", "host:", "host:x", "host:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)
    assert negotiate_version(PROTOCOL_VERSION + 5) == PROTOCOL_VERSION
    assert negotiate_version(PROTOCOL_VERSION) == PROTOCOL_VERSION
    assert negotiate_version(MIN_PROTOCOL_VERSION) == MIN_PROTOCOL_VERSION
    assert negotiate_version(MIN_PROTOCOL_VERSION - 1) is None


# ---- hypothesis fuzzing -------------------------------------------------------------------

FUZZ_MAX = 256


def _feed_all(dec: Decoder, chunks: list[bytes]) -> list[Message]:
    out: list[Message] = []
    for chunk in chunks:
        try:
            out += dec.feed(chunk)
        except ProtocolError:
            return out
        assert dec.buffered <= FUZZ_MAX + 4
    return out


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=20))
def test_fuzz_random_bytes(data: bytes, cuts: list[int]) -> None:
    _feed_all(Decoder(FUZZ_MAX), _split(data, cuts))


# frames whose headers are plausible, with random or lightly mutated payloads
_payloads = st.one_of(
    st.binary(min_size=1, max_size=FUZZ_MAX + 8),
    st.sampled_from(sorted(SAMPLES)).map(lambda t: msgpack.packb([t, 1, SAMPLES[t]])),
    st.builds(
        lambda t, i, b: (lambda p: p[:i % len(p)] + bytes([b]) + p[i % len(p) + 1 :])(
            msgpack.packb([t, 1, SAMPLES[t]])
        ),
        st.sampled_from(sorted(SAMPLES)),
        st.integers(min_value=0),
        st.integers(0, 255),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_payloads, max_size=8), st.lists(st.integers(min_value=0), max_size=20))
def test_fuzz_framed_payloads(payloads: list[bytes], cuts: list[int]) -> None:
    data = b"".join(frame(p) for p in payloads)
    _feed_all(Decoder(FUZZ_MAX), _split(data, cuts))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(sorted(SAMPLES)), min_size=1, max_size=12),
    st.lists(st.integers(min_value=0), max_size=30),
)
def test_fuzz_valid_streams_any_split(types: list[str], cuts: list[int]) -> None:
    data = b"".join(encode(t, SAMPLES[t], rid=i) for i, t in enumerate(types))
    dec = Decoder()
    got: list[Message] = []
    for chunk in _split(data, cuts):
        got += dec.feed(chunk)
    assert got == [Message(t, i, SAMPLES[t]) for i, t in enumerate(types)]
    assert dec.buffered == 0


# ---- an echo peer and a client built on Connection -------------------------------------------
#
# These tests are about the Connection base only: framing on real sockets, request/response
# correlation, fatal errors, flow control. The peer below is a test double, not a server: it has
# no handshake and no session rules. The real server's rules (HELLO first, handshake and
# heartbeat timeouts, version, token, REJECT/REDIRECT/WELCOME, API dispatch) are tested against
# the real FastJobServer in tests/test_session.py.


class EchoPeer(Connection):
    """Test double for the Connection base only (NOT a FastJob server: no handshake, no rules).

    Echoes every one-way message (rid 0) back unchanged. Answers every request (rid > 0) with
    RESPONSE ``{"type": ..., "body": ...}``, except by the request body's ``name``:
    ``missing`` -> ERROR not_found, ``boom`` -> raises in on_message (Connection answers ERROR
    internal), ``hold`` -> kept in ``held`` for the test to answer, ``hang-up`` -> close,
    ``fail`` -> ``fail()`` with the code given in ``params`` (a fatal ERROR, then close).
    """

    def __init__(self, listener: EchoListener, **kw: Any) -> None:
        super().__init__(**kw)
        self.listener = listener
        self.held: list[Message] = []
        self.closed_with: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_connect(self) -> None:
        self.listener.peers.append(self)

    def on_close(self, exc: Exception | None) -> None:
        self.closed_with.set_result(exc)

    def on_message(self, msg: Message) -> None:
        if not msg.rid:
            self.send(msg.type, msg.body)  # echo, so the client sees it round-trip
            return
        name = msg.body.get("name")
        if name == "missing":
            self.respond_error(msg, ErrorCode.NOT_FOUND, "no such job")
        elif name == "boom":
            raise RuntimeError("handler bug")
        elif name == "hold":
            self.held.append(msg)  # answered later by the test
        elif name == "hang-up":
            self.close()
        elif name == "fail":
            self.fail(msg.body["params"], "told to fail")
        else:
            self.respond(msg, {"type": msg.type, "body": msg.body})


class EchoListener:
    """A loopback listener of EchoPeers (see EchoPeer: a test double, not a server)."""

    def __init__(self, **conn_kw: Any) -> None:
        self.conn_kw = conn_kw
        self.peers: list[EchoPeer] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, ssl_ctx: ssl.SSLContext | None = None) -> EchoListener:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: EchoPeer(self, **self.conn_kw), "127.0.0.1", 0, ssl=ssl_ctx
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for peer in self.peers:
            peer.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


class ClientConn(Connection):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.closed_with: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_message(self, msg: Message) -> None:
        self.inbox.put_nowait(msg)

    def on_close(self, exc: Exception | None) -> None:
        self.closed_with.set_result(exc)


async def connect(port: int, ssl_ctx: ssl.SSLContext | None = None, **kw: Any) -> ClientConn:
    """A ClientConn to an EchoListener, once a first request has made the round trip (so the
    listener's side of it is in ``peers``)."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: ClientConn(**kw), "127.0.0.1", port, ssl=ssl_ctx,
        server_hostname="localhost" if ssl_ctx else None,
    )
    reply = await conn.request("JOB_LIST", {}, timeout=5)
    assert reply == Message("RESPONSE", reply.rid, {"type": "JOB_LIST", "body": {}})
    return conn


# ---- over real sockets ----------------------------------------------------------------------


def test_every_message_type_over_a_connection(run: Callable[..., Any]) -> None:
    async def main() -> None:
        srv = await EchoListener().start()
        conn = await connect(srv.port)
        for mtype, body in SAMPLES.items():
            conn.send(mtype, body)  # one-way: echoed back as it was
            assert await asyncio.wait_for(conn.inbox.get(), 5) == Message(mtype, 0, body)
            if mtype not in REPLY_TYPES:  # every other type also travels as a request
                reply = await conn.request(mtype, body)
                assert reply == Message("RESPONSE", reply.rid, {"type": mtype, "body": body})
        conn.close()
        await conn.wait_closed()
        await srv.stop()

    run(main())


def test_requests_correlate_time_out_and_fail_on_close(run: Callable[..., Any]) -> None:
    async def main() -> None:
        srv = await EchoListener().start()
        conn = await connect(srv.port)
        server_side = srv.peers[0]
        # out-of-order answers land on the right requests
        held = [asyncio.ensure_future(conn.request("TRIGGER", {"name": "hold", "params": i}))
                for i in range(5)]
        one = await conn.request("JOB_GET", {"name": "a"})
        assert one.body["body"] == {"name": "a"}
        for msg in reversed(server_side.held):
            server_side.respond(msg, {"instance_id": msg.body["params"]})
        assert [(await f).body["instance_id"] for f in held] == list(range(5))
        server_side.held.clear()
        # an ERROR reply raises RemoteError and the connection carries on
        with pytest.raises(RemoteError) as info:
            await conn.request("JOB_GET", {"name": "missing"})
        assert info.value.code == ErrorCode.NOT_FOUND
        # an exception in the peer's on_message becomes ERROR internal, not a dead connection
        with pytest.raises(RemoteError) as info:
            await conn.request("TRIGGER", {"name": "boom"})
        assert info.value.code == ErrorCode.INTERNAL
        # a request nobody answers times out and leaves nothing pending
        with pytest.raises(asyncio.TimeoutError):
            await conn.request("TRIGGER", {"name": "hold"}, timeout=0.05)
        assert not conn._pending
        # the connection closing fails pending requests
        pending = asyncio.ensure_future(conn.request("TRIGGER", {"name": "hold"}))
        await conn.request("JOB_GET", {"name": "sync"})  # the held request has arrived
        server_side.close()
        with pytest.raises(ConnectionError):
            await pending
        with pytest.raises(ConnectionError):
            await conn.request("JOB_LIST", {})
        await srv.stop()

    run(main())


def test_fatal_error_reaches_on_close_on_both_sides(run: Callable[..., Any]) -> None:
    async def main() -> None:
        srv = await EchoListener().start()
        conn = await connect(srv.port)
        pending = asyncio.ensure_future(conn.request("TRIGGER", {"name": "hold"}))
        await conn.request("JOB_GET", {"name": "sync"})  # the held request has arrived
        conn.send("TRIGGER", {"name": "fail", "params": ErrorCode.SHUTTING_DOWN}, rid=999)
        # the failing side reports its own ProtocolError, the other side the peer's RemoteError
        exc = await asyncio.wait_for(conn.closed_with, 5)
        assert isinstance(exc, RemoteError) and exc.code == ErrorCode.SHUTTING_DOWN
        server_exc = await asyncio.wait_for(srv.peers[0].closed_with, 5)
        assert isinstance(server_exc, ProtocolError) and server_exc.code == ErrorCode.SHUTTING_DOWN
        with pytest.raises(ConnectionError) as info:  # outstanding requests fail, naming the cause
            await pending
        assert ErrorCode.SHUTTING_DOWN in str(info.value)
        err = conn.inbox.get_nowait()  # on_message saw the fatal ERROR too, before the close
        assert err.type == "ERROR" and err.rid == 0 and err.body["fatal"] is True
        assert conn.inbox.empty()
        await srv.stop()

    run(main())


async def _bad_peer(port: int, data: bytes, eof: bool = False) -> list[Message]:
    """Send raw bytes, read until the other side hangs up, decode what it said."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if data:
        writer.write(data)
    if eof:
        writer.write_eof()
    received = await asyncio.wait_for(reader.read(), 5)  # read() returns at EOF: disconnected
    writer.close()
    return Decoder().feed(received)


HELLO_FRAME = encode("HELLO", SAMPLES["HELLO"], rid=1)


@pytest.mark.parametrize(
    "data, eof, code",
    [
        (b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", False, ErrorCode.BAD_FRAME),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, ErrorCode.FRAME_TOO_LARGE),
        (b"\xff\xff\xff\xff", False, ErrorCode.FRAME_TOO_LARGE),
        (b"\x00\x00\x00\x00", False, ErrorCode.BAD_FRAME),
        (HELLO_FRAME[:20], True, ErrorCode.BAD_FRAME),  # truncated frame, then EOF
        (frame(msgpack.packb({"type": "HELLO"})), False, ErrorCode.BAD_MESSAGE),
        (frame(msgpack.packb(["HELLO", 1, {"version": PROTOCOL_VERSION}])), False, ErrorCode.BAD_MESSAGE),
        (encode("NOT_A_TYPE", {}, rid=1), False, ErrorCode.UNKNOWN_TYPE),
    ],
    ids=["garbage", "http", "oversized", "zero", "truncated", "shape", "fields", "unknown"],
)
def test_malformed_stream_fails_that_connection_only(
    run: Callable[..., Any], data: bytes, eof: bool, code: str
) -> None:
    async def main() -> None:
        srv = await EchoListener().start()
        good = await connect(srv.port)
        msgs = await _bad_peer(srv.port, data, eof)
        assert len(msgs) == 1
        err = msgs[0]
        assert err.type == "ERROR" and err.body["code"] == code and err.body["fatal"] is True
        bad_side = srv.peers[1]
        exc = await asyncio.wait_for(bad_side.closed_with, 5)
        assert isinstance(exc, ProtocolError) and exc.code == code
        # the well-behaved connection is unaffected
        reply = await good.request("JOB_GET", {"name": "still-here"})
        assert reply.body["body"] == {"name": "still-here"}
        assert not good.closed
        good.close()
        await srv.stop()

    run(main())


def test_drain_follows_pause_and_resume(run: Callable[..., Any]) -> None:
    async def main() -> None:
        srv = await EchoListener().start()
        conn = await connect(srv.port)
        # protocol level: pause_writing blocks drain, resume_writing releases it
        conn.pause_writing()
        waiter = asyncio.ensure_future(conn.drain())
        done, _ = await asyncio.wait({waiter}, timeout=0)
        assert not done
        conn.resume_writing()
        await asyncio.wait_for(waiter, 1)

        # socket level: the peer writes to a client that stopped reading
        server_side = srv.peers[0]
        conn.transport.pause_reading()
        big = {"anything": "x" * (256 * 1024)}
        sent = 0
        for _ in range(2000):
            server_side.send("RESPONSE", big)
            sent += 1
            drained = asyncio.ensure_future(server_side.drain())
            await asyncio.sleep(0)  # a yield for the flush, not a timing assumption
            if not drained.done():
                break
        else:
            pytest.fail("the transport never paused writing")
        conn.transport.resume_reading()
        await asyncio.wait_for(drained, 10)  # the reader caught up
        for _ in range(sent):
            msg = await conn.inbox.get()
            assert len(msg.body["anything"]) == 256 * 1024
        conn.close()
        await srv.stop()

    run(main())


def test_slow_consumer_is_disconnected(run: Callable[..., Any]) -> None:
    async def main() -> None:
        srv = await EchoListener(max_write_buffer=1 << 20).start()
        conn = await connect(srv.port)
        server_side = srv.peers[0]
        conn.transport.pause_reading()
        big = {"anything": "x" * (256 * 1024)}
        for _ in range(2000):  # up to 500 MiB: far beyond socket buffers + max_write_buffer
            server_side.send("RESPONSE", big)  # no drain(): a careless sender
            if server_side.closed:
                break
            await asyncio.sleep(0)
        exc = await asyncio.wait_for(server_side.closed_with, 5)
        assert isinstance(exc, ProtocolError) and exc.code == ErrorCode.SLOW_CONSUMER
        conn.transport.resume_reading()
        await asyncio.wait_for(conn.wait_closed(), 5)
        await srv.stop()

    run(main())


def test_send_refuses_frames_over_max_frame(run: Callable[..., Any]) -> None:
    async def main() -> None:
        srv = await EchoListener().start()
        conn = await connect(srv.port, max_frame=1024)
        with pytest.raises(ProtocolError) as info:
            conn.send("RESPONSE", {"x": "y" * 2000})
        assert info.value.code == ErrorCode.FRAME_TOO_LARGE
        assert (await conn.request("JOB_LIST", {})).body["type"] == "JOB_LIST"
        conn.close()
        await srv.stop()

    run(main())


def test_connection_over_tls(run: Callable[..., Any]) -> None:
    """The Connection base over TLS transports of both loops (the real server and worker over
    TLS: tests/test_tls.py)."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)

    async def main() -> None:
        srv = await EchoListener().start(server_ctx)
        conn = await connect(srv.port, client_ctx)
        assert conn.transport.get_extra_info("ssl_object") is not None
        assert srv.peers[0].transport.get_extra_info("ssl_object") is not None
        reply = await conn.request("TRIGGER", {"name": "tls", "params": {"p": 1}})
        assert reply.body["body"] == {"name": "tls", "params": {"p": 1}}
        conn.send("DISPATCH", DISPATCH_BODY)
        assert await conn.inbox.get() == Message("DISPATCH", 0, DISPATCH_BODY)
        # many frames coalesced into TLS records arrive whole and in order
        for i in range(200):
            conn.send("PING", {"ts": float(i)})
        assert [(await conn.inbox.get()).body["ts"] for _ in range(200)] == [float(i) for i in range(200)]
        conn.close()
        await conn.wait_closed()
        await srv.stop()

    run(main())


# ---- protocol.md agrees with the code -------------------------------------------------------

SPEC = os.path.join(os.path.dirname(__file__), os.pardir, "protocol.md")


def _spec_tables() -> dict[str, Any]:
    """{name: {field: type-with-?} or [types]} from the ``#### `NAME` `` sections of protocol.md."""
    tables: dict[str, Any] = {}
    current: str | None = None
    with open(SPEC, encoding="utf-8") as f:
        for line in f:
            heading = re.match(r"^#{3,4} `(\w+)`\s*$", line)
            if heading:
                current = heading.group(1)
                tables[current] = {}
                continue
            if line.startswith("#"):
                current = None
                continue
            row = re.match(r"^\| (`\w+`|\d+) \| `([^`]+)` \| (yes|no) \|", line)
            if current and row:
                key, mtype, required = row.groups()
                mtype = mtype.replace("\\|", "|") + ("" if required == "yes" else "?")
                tables[current][key.strip("`")] = mtype
    for name, fields in tables.items():
        if fields and all(k.isdigit() for k in fields):
            tables[name] = [fields[str(i)] for i in range(len(fields))]
    return tables


def test_protocol_md_tables_match_the_code() -> None:
    tables = _spec_tables()
    assert {n: tables.get(n) for n in SCHEMAS} == SCHEMAS
    assert {n: tables.get(n) for n in STRUCTS} == STRUCTS
    assert set(tables) == set(SCHEMAS) | set(STRUCTS)


def test_protocol_md_hex_examples() -> None:
    with open(SPEC, encoding="utf-8") as f:
        text = f.read()

    def hex_tokens(s: str) -> str:
        out = []
        for line in s.splitlines():
            for tok in line.split():
                if not re.fullmatch(r"[0-9a-f]{2}", tok):
                    break
                out.append(tok)
        return "".join(out)

    annotated = text[text.index("00 00 00 28") :].split("```")[0]
    assert hex_tokens(annotated) == encode("HELLO", {"version": 1, "app": "demo", "worker_id": "w1"}, 1).hex()
    compact = hex_tokens(text.replace("`", "\n"))
    welcome = {"version": 1, "server_id": "s1", "heartbeat_interval": 5.0,
               "heartbeat_timeout": 15.0, "max_frame": 1048576}
    for data in (
        encode("WELCOME", welcome, 1),
        encode("PING", {}),
        encode("ERROR", {"code": "handshake_timeout", "message": "no HELLO", "fatal": True}),
    ):
        assert data.hex() in compact
