"""FastJob wire protocol: length-prefixed msgpack frames over TCP (optionally TLS).

``protocol.md`` at the repository root is the normative specification; this module is its
Python implementation and is shared by the server and the worker:

* :func:`encode` / :class:`Decoder` - framing plus envelope and per-type body validation.
  The decoder is incremental (many frames per read, frames split across reads) and never
  buffers more than ``max_frame + 4`` bytes.
* :class:`Connection` - an :class:`asyncio.Protocol` base with write coalescing (one
  ``transport.write`` per loop iteration), flow control, request/response correlation and
  idle (heartbeat / handshake) watching.

The message schemas live in :data:`SCHEMAS` / :data:`STRUCTS` as small type strings so that
``protocol.md`` can be checked against them by the tests.
"""
from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack

__all__ = [
    "PROTOCOL_VERSION",
    "MIN_PROTOCOL_VERSION",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "HEADER",
    "Message",
    "ErrorCode",
    "ProtocolError",
    "RemoteError",
    "REPLY_TYPES",
    "SCHEMAS",
    "SINCE_VERSION",
    "STRUCTS",
    "encode",
    "validate",
    "Decoder",
    "Connection",
    "negotiate_version",
    "parse_address",
]

log = logging.getLogger("fastjob.protocol")

PROTOCOL_VERSION = 2
"""The highest protocol version this implementation speaks."""
MIN_PROTOCOL_VERSION = 1
"""The lowest protocol version this implementation still accepts."""
DEFAULT_MAX_FRAME = 1 << 20
"""Default limit of one frame's payload, in bytes (1 MiB)."""
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a server waits for HELLO before closing with ``handshake_timeout``."""

HEADER = struct.Struct(">I")
"""The frame header: payload length as a 4-byte unsigned big-endian integer."""
_HEADER_SIZE = HEADER.size
_pack_header = HEADER.pack
_unpack_header_from = HEADER.unpack_from


class Message(NamedTuple):
    """One decoded frame: ``[type, rid, body]``."""

    type: str
    rid: int
    body: dict[str, Any]


class ErrorCode:
    """Error codes carried in ERROR.code and REJECT.code (plain strings on the wire)."""

    BAD_FRAME = "bad_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    BAD_TOKEN = "bad_token"
    NOT_OWNER = "not_owner"
    NOT_FOUND = "not_found"
    INVALID = "invalid"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    SHUTTING_DOWN = "shutting_down"
    SLOW_CONSUMER = "slow_consumer"
    BUSY = "busy"


class ProtocolError(Exception):
    """The peer broke the protocol (or a local frame would); ``code`` is an :class:`ErrorCode`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteError(Exception):
    """The peer answered a request with ERROR."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------
# Schemas. Type strings: int, float (int accepted), str, bool, any, map, array,
# array[T], a STRUCTS name, "T|nil". A trailing "?" marks an optional field.
# protocol.md carries the same tables; tests/test_protocol.py checks they agree.
# --------------------------------------------------------------------------------------

STRUCTS: dict[str, Any] = {
    # a map struct is a dict of fields; a tuple struct (fixed-length array) is a list of types
    "log_line": ["float", "str", "str"],
    "sl_job": {
        "id": "int",
        "name": "str",
        "handler": "str",
        "schedule_type": "str",
        "period": "float",
        "params": "any",
        "timeout": "float|nil",
        "allow_overlap": "bool",
        "version": "int",
    },
    "sl_report": {
        "job_id": "int",
        "runs": "int",
        "failures": "int",
        "last_error": "str|nil",
        "last_run_at": "float|nil",
        "lateness_p50": "float",
        "lateness_p99": "float",
        "lateness_max": "float",
        "skipped": "int?",
    },
    "job_def": {
        "name": "str",
        "handler": "str",
        "schedule_type": "str",
        "schedule_expr": "str?",
        "timezone": "str?",
        "params": "any?",
        "timeout": "float|nil?",
        "retry_times": "int?",
        "retry_backoff": "float?",
        "misfire_policy": "str?",
        "tags": "array[str]?",
        "routing": "str?",
        "run_once": "bool?",
        "enabled": "bool?",
        "overlap": "str?",
        "catch_up_window": "float?",
        "max_queued": "int?",
        "allow_overlap": "bool?",
    },
}

SCHEMAS: dict[str, dict[str, str]] = {
    # handshake
    "HELLO": {
        "version": "int",
        "app": "str",
        "worker_id": "str",
        "role": "str?",
        "token": "str|nil?",
        "tags": "array[str]?",
        "capacity": "int?",
        "running": "array[int]?",
        "finished": "array[int]?",
        "second_level": "array[int]?",
        "host": "str?",
        "pid": "int?",
    },
    "WELCOME": {
        "version": "int",
        "server_id": "str",
        "heartbeat_interval": "float",
        "heartbeat_timeout": "float",
        "max_frame": "int",
        "run_lease": "float?",
    },
    "REDIRECT": {"address": "str", "server_id": "str?", "retry_in": "float?"},
    "REJECT": {"code": "str", "reason": "str"},
    # liveness
    "PING": {"ts": "float?", "running": "int?"},
    "PONG": {"ts": "float?", "lease": "bool?"},
    "DRAIN": {"reason": "str?"},
    # regular jobs
    "DISPATCH": {
        "instance_id": "int",
        "job_id": "int",
        "job": "str",
        "handler": "str",
        "params": "any",
        "attempt": "int",
        "scheduled_at": "float",
        "timeout": "float|nil",
    },
    "ACK": {"instance_id": "int", "accepted": "bool", "reason": "str?"},
    "START": {"instance_id": "int", "started_at": "float"},
    "LOG": {"instance_id": "int", "lines": "array[log_line]"},
    "RESULT": {
        "instance_id": "int",
        "status": "str",
        "result": "any?",
        "error": "str?",
        "started_at": "float?",
        "finished_at": "float",
    },
    "CANCEL": {"instance_id": "int", "reason": "str?"},
    # second-level jobs
    "SL_ASSIGN": {"job": "sl_job", "lease": "float"},
    "SL_REVOKE": {"job_id": "int", "reason": "str?"},
    "SL_REPORT": {"reports": "array[sl_report]"},
    # client API
    "JOB_UPSERT": {"job": "job_def"},
    "JOB_DELETE": {"name": "str"},
    "JOB_ENABLE": {"name": "str", "enabled": "bool"},
    "JOB_GET": {"name": "str"},
    "JOB_LIST": {},
    "TRIGGER": {"name": "str", "params": "any?"},
    "INSTANCE_GET": {"instance_id": "int"},
    "INSTANCE_LIST": {"job": "str?", "status": "array[str]?", "limit": "int?"},
    "LOG_GET": {"instance_id": "int", "limit": "int?"},
    # generic
    "RESPONSE": {},
    "ERROR": {"code": "str", "message": "str", "fatal": "bool?"},
}

#: Message types added after version 1, with the version that defines them: a peer must not
#: send one on a connection that negotiated an older version (the receiver: ``unknown_type``).
SINCE_VERSION: dict[str, int] = {"DRAIN": 2}

REPLY_TYPES = frozenset({"RESPONSE", "ERROR", "WELCOME", "REDIRECT", "REJECT"})
"""Types that answer a request (they carry the request's rid)."""

# Compiled form: a map checker is a tuple of (name, allowed python types or None for any,
# required, sub-checker or None). Exact type() membership keeps bool out of int and vice versa.
_BASE_TYPES: dict[str, frozenset[type] | None] = {
    "int": frozenset({int}),
    "float": frozenset({float, int}),
    "str": frozenset({str}),
    "bool": frozenset({bool}),
    "map": frozenset({dict}),
    "array": frozenset({list, tuple}),
    "any": None,
}
_Check = Callable[[Any, str], None]
_MISSING = object()


def _type_name(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


def _compile_type(spec: str) -> tuple[frozenset[type] | None, _Check | None]:
    """Turn a type string into (allowed types, deep checker) for the validator."""
    nullable = spec.endswith("|nil")
    if nullable:
        spec = spec[:-4]
    sub: _Check | None = None
    if spec in _BASE_TYPES:
        types = _BASE_TYPES[spec]
    elif spec.startswith("array[") and spec.endswith("]"):
        types = _BASE_TYPES["array"]
        sub = _array_checker(*_compile_type(spec[6:-1]), spec[6:-1])
    elif spec in STRUCTS:
        struct_spec = STRUCTS[spec]
        if isinstance(struct_spec, dict):
            types = _BASE_TYPES["map"]
            sub = _map_checker(_compile_fields(struct_spec))
        else:
            types = _BASE_TYPES["array"]
            sub = _tuple_checker([_compile_type(s) + (s,) for s in struct_spec])
    else:
        raise ValueError(f"unknown type in schema: {spec!r}")
    if nullable and types is not None:
        types = types | {type(None)}
    return types, sub


def _compile_fields(fields: dict[str, str]) -> tuple[Any, ...]:
    out = []
    for name, spec in fields.items():
        required = not spec.endswith("?")
        spec = spec.rstrip("?")
        types, sub = _compile_type(spec)
        out.append((name, types, required, sub, spec))
    return tuple(out)


def _bad(path: str, spec: str, value: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, f"{path}: expected {spec}, got {_type_name(value)}")


def _check_fields(body: dict[str, Any], fields: tuple[Any, ...], path: str) -> None:
    get = body.get
    for name, types, required, sub, spec in fields:
        value = get(name, _MISSING)
        if value is _MISSING or (value is None and not required):
            if required:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{path}.{name}: required field missing")
            continue  # optional and absent (nil counts as absent)
        if types is not None and type(value) not in types:
            raise _bad(f"{path}.{name}", spec, value)
        if sub is not None and value is not None:
            sub(value, f"{path}.{name}")


def _map_checker(fields: tuple[Any, ...]) -> _Check:
    def check(value: Any, path: str) -> None:
        _check_fields(value, fields, path)

    return check


def _array_checker(types: frozenset[type] | None, sub: _Check | None, spec: str) -> _Check:
    def check(value: Any, path: str) -> None:
        for i, item in enumerate(value):
            if types is not None and type(item) not in types:
                raise _bad(f"{path}[{i}]", spec, item)
            if sub is not None and item is not None:
                sub(item, f"{path}[{i}]")

    return check


def _tuple_checker(items: list[Any]) -> _Check:
    def check(value: Any, path: str) -> None:
        if len(value) != len(items):
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"{path}: expected {len(items)} items, got {len(value)}"
            )
        for i, (item, (types, sub, spec)) in enumerate(zip(value, items, strict=True)):
            if types is not None and type(item) not in types:
                raise _bad(f"{path}[{i}]", spec, item)
            if sub is not None and item is not None:
                sub(item, f"{path}[{i}]")

    return check


_COMPILED: dict[str, tuple[Any, ...]] = {name: _compile_fields(fields) for name, fields in SCHEMAS.items()}


def _fast_checker(fields: tuple[Any, ...], path: str) -> Callable[[dict[str, Any]], None] | None:
    """Compile a schema into one boolean expression over the body (the hot path).

    Why generated code: a DISPATCH is checked for every frame, and a straight-line expression
    costs a fraction of the generic loop. When the expression says "wrong", the generic
    :func:`_check_fields` runs to raise a precise error, so both always agree.
    """
    if not fields:
        return None
    env: dict[str, Any] = {"M": _MISSING, "slow": _check_fields, "fields": fields, "path": path,
                           "ProtocolError": ProtocolError, "BAD": ErrorCode.BAD_MESSAGE}
    tests: list[str] = []
    subs: list[str] = []
    for i, (name, types, required, sub, _spec) in enumerate(fields):
        if types is None:
            if required:
                tests.append(f"{name!r} not in body")
        else:
            # a missing required field reads as M (never allowed), a missing optional one as None
            allowed = types if required else types | {type(None)}
            value = f"get({name!r}, M)" if required else f"get({name!r})"
            if len(allowed) == 1:
                env[f"T{i}"] = next(iter(allowed))
                tests.append(f"type({value}) is not T{i}")
            else:
                env[f"T{i}"] = allowed
                tests.append(f"type({value}) not in T{i}")
        if sub is not None:
            env[f"S{i}"] = sub
            subs.append(f"    v = get({name!r})\n    if v is not None: S{i}(v, {path + '.' + name!r})\n")
    source = "def check(body):\n    get = body.get\n"
    if tests:
        source += "    if " + " or ".join(tests) + ":\n"
        source += "        slow(body, fields, path)\n"
        source += "        raise ProtocolError(BAD, path)  # unreachable: slow() raised\n"
    source += "".join(subs)
    exec(compile(source, f"<schema {path}>", "exec"), env)
    checker: Callable[[dict[str, Any]], None] = env["check"]
    return checker


_CHECKERS: dict[str, Callable[[dict[str, Any]], None] | None] = {
    name: _fast_checker(fields, name) for name, fields in _COMPILED.items()
}


def validate(type: str, body: Any) -> None:
    """Check ``body`` against the schema of ``type``; raise :class:`ProtocolError` if it is wrong.

    Unknown extra fields are ignored (forward compatibility); optional fields may be nil.
    """
    if type not in _CHECKERS:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {type!r}")
    check = _CHECKERS[type]
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{type}: body must be a map")
    if check is not None:
        check(body)


def negotiate_version(client_version: int) -> int | None:
    """The version to answer in WELCOME, or None when the client is too old (REJECT)."""
    version = min(client_version, PROTOCOL_VERSION)
    return version if version >= MIN_PROTOCOL_VERSION else None


def parse_address(s: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6]:port"``) into (host, port); ValueError if malformed."""
    host, sep, port_text = s.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"bad address {s!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"bad address {s!r}: port out of range")
    return host, port


# --------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------

# One packer for the process: packing is synchronous, so sharing is safe within a thread.
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_unpackb = msgpack.unpackb


def encode(type: str, body: dict[str, Any], rid: int = 0) -> bytes:
    """Header + payload of one frame. The body is not validated here (see :func:`validate`)."""
    payload: bytes = _packb([type, rid, body])
    return _pack_header(len(payload)) + payload


class Decoder:
    """Incremental frame decoder with envelope and schema validation.

    Why incremental and bounded: ``data_received`` gets arbitrary chunks, and a peer must not
    be able to make us hold more than one frame. The length is checked from the header alone,
    before any of the payload is buffered. After an error the decoder stays failed.
    """

    __slots__ = ("max_frame", "_buf", "_error")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame (never above max_frame + 4)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray) -> list[Message]:
        """Consume ``data``; return every complete message, in order."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        if buf:
            buf += data
            data = buf
        try:
            msgs, pos = self._parse(data)
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        rest = len(data) - pos
        if rest == 0:
            if buf:
                self._buf = bytearray()
        elif buf:
            del buf[:pos]
        else:
            self._buf = bytearray(memoryview(data)[pos:])
        return msgs

    def _parse(self, data: Any) -> tuple[list[Message], int]:
        """Decode whole frames from the start of ``data``; return them and the bytes used."""
        msgs: list[Message] = []
        max_frame = self.max_frame
        end = len(data)
        pos = 0
        view = None
        while end - pos >= _HEADER_SIZE:
            (size,) = _unpack_header_from(data, pos)
            if size == 0:
                raise ProtocolError(ErrorCode.BAD_FRAME, "zero-length frame")
            if size > max_frame:
                raise ProtocolError(
                    ErrorCode.FRAME_TOO_LARGE, f"frame of {size} bytes exceeds limit {max_frame}"
                )
            start = pos + _HEADER_SIZE
            stop = start + size
            if stop > end:
                break
            if view is None:
                view = memoryview(data)
            try:
                obj = _unpackb(view[start:stop])
            except Exception as exc:  # ExtraData, FormatError, UnicodeDecodeError, ValueError...
                raise ProtocolError(ErrorCode.BAD_FRAME, f"undecodable payload: {exc}") from None
            msgs.append(_envelope(obj))
            pos = stop
        if view is not None:
            view.release()  # a live export would forbid resizing the bytearray buffer
        return msgs, pos


_tuple_new = tuple.__new__


def _envelope(obj: Any) -> Message:
    """Check ``[type, rid, body]`` and the body's schema; build the Message."""
    if type(obj) is not list or len(obj) != 3:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "envelope must be an array [type, rid, body]")
    mtype, rid, body = obj
    if type(mtype) is not str:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "envelope type must be a string")
    if type(rid) is not int or rid < 0:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "envelope rid must be an unsigned integer")
    if type(body) is not dict:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "envelope body must be a map")
    if mtype not in _CHECKERS:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {mtype[:64]!r}")
    check = _CHECKERS[mtype]
    if check is not None:
        check(body)
    return _tuple_new(Message, (mtype, rid, body))


# --------------------------------------------------------------------------------------
# Connection
# --------------------------------------------------------------------------------------

_RID_LIMIT = 1 << 32
_DRAIN_FLUSH_THRESHOLD = 64 * 1024


class Connection(asyncio.Protocol):
    """Shared base of the server's per-worker connection and the worker's client connection.

    Subclasses override :meth:`on_connect`, :meth:`on_message` and :meth:`on_close`.
    Outgoing frames are coalesced into one ``transport.write`` per loop iteration; a peer that
    does not read cannot make us buffer more than ``max_write_buffer`` bytes.
    """

    def __init__(
        self, *, max_frame: int = DEFAULT_MAX_FRAME, max_write_buffer: int = 16 << 20
    ) -> None:
        self.max_frame = max_frame
        self.max_write_buffer = max_write_buffer
        self.transport: asyncio.Transport | None = None
        self.last_received: float = 0.0
        self._decoder = Decoder(max_frame)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out = bytearray()
        self._flush_scheduled = False
        self._transport_buffered = 0  # transport's write buffer size seen at the last flush
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_rid = 1
        self._closing = False
        self._lost = False
        self._close_exc: Exception | None = None
        self._closed_waiters: list[asyncio.Future[Any]] = []
        self._paused = False
        self._drain_waiters: list[asyncio.Future[Any]] = []
        self._idle_timeout: float | None = None
        self._idle_code = ErrorCode.HEARTBEAT_TIMEOUT
        self._idle_handle: asyncio.TimerHandle | None = None
        self._peername: Any = None

    # ---- hooks -----------------------------------------------------------------------
    def on_connect(self) -> None:
        """Called once the transport is up."""

    def on_message(self, msg: Message) -> None:
        """Called for every incoming message that is not a reply to one of our requests."""

    def on_close(self, exc: Exception | None) -> None:
        """Called once when the connection is gone. ``exc`` says why (None: clean close).

        It is a :class:`ProtocolError` when we failed the connection (``fail``, slow consumer,
        idle timeout), a :class:`RemoteError` when the peer sent a fatal ERROR before closing.
        """

    # ---- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        self._peername = transport.get_extra_info("peername")
        self.last_received = self._loop.time()
        try:
            self.on_connect()
        except Exception:
            log.exception("on_connect failed for %s", self._peername)
            self.fail(ErrorCode.INTERNAL, "internal error")

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            msgs = self._decoder.feed(data)
        except ProtocolError as exc:
            log.warning("protocol error from %s: %s", self._peername, exc)
            self.fail(exc.code, exc.message)
            return
        if not msgs:
            return
        self.last_received = self._loop.time()  # type: ignore[union-attr]
        pending = self._pending
        for msg in msgs:
            if msg.rid and pending and msg.type in REPLY_TYPES:
                fut = pending.pop(msg.rid, None)
                if fut is not None:
                    if not fut.done():
                        if msg.type == "ERROR":
                            fut.set_exception(RemoteError(msg.body["code"], msg.body["message"]))
                        else:
                            fut.set_result(msg)
                    continue
            if msg.type == "ERROR" and msg.body.get("fatal"):
                self._close_exc = RemoteError(msg.body["code"], msg.body["message"])
            try:
                self.on_message(msg)
            except Exception:
                log.exception("on_message(%s) failed for %s", msg.type, self._peername)
                if msg.rid and msg.type not in REPLY_TYPES:
                    self.respond_error(msg, ErrorCode.INTERNAL, "internal error")
            if self._closing:
                break

    def eof_received(self) -> bool | None:
        """The peer half-closed. A partial frame left behind is reported before we close."""
        if self._decoder.buffered and not self._closing:
            self.fail(ErrorCode.BAD_FRAME, "stream ended inside a frame")
        return None  # let the transport close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._lost = True
        self._cancel_idle()
        self._out = bytearray()
        reason = self._close_exc or exc
        err = ConnectionError(f"connection closed{f': {reason}' if reason else ''}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_exception(err)
        self._drain_waiters.clear()
        for fut in self._closed_waiters:
            if not fut.done():
                fut.set_result(None)
        self._closed_waiters.clear()
        self.transport = None
        try:
            self.on_close(reason)
        except Exception:
            log.exception("on_close failed for %s", self._peername)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()

    # ---- sending -----------------------------------------------------------------------
    def send(self, type: str, body: dict[str, Any], rid: int = 0) -> None:
        """Queue one frame; all frames queued in a loop iteration go out in one write.

        Raises ProtocolError(frame_too_large) if the frame exceeds ``max_frame`` (the peer
        would drop the connection). A send on a closed connection is dropped.
        """
        if self._closing:
            log.debug("dropping %s to closed connection %s", type, self._peername)
            return
        if self._loop is None:
            raise ConnectionError("not connected")
        payload = _packb([type, rid, body])
        size = len(payload)
        if size > self.max_frame:
            raise ProtocolError(
                ErrorCode.FRAME_TOO_LARGE, f"{type} frame of {size} bytes exceeds {self.max_frame}"
            )
        out = self._out
        out += _pack_header(size)
        out += payload
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        if len(out) + self._transport_buffered > self.max_write_buffer:
            self._slow_consumer()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out or self.transport is None or self._lost:
            return
        data = self._out
        self._out = bytearray()  # the transport may keep a reference to the old one
        transport = self.transport
        transport.write(data)
        buffered = transport.get_write_buffer_size()
        self._transport_buffered = buffered
        if buffered > self.max_write_buffer and not self._closing:
            self._slow_consumer()

    def _slow_consumer(self) -> None:
        """The peer does not read: drop it instead of buffering without bound."""
        log.warning(
            "closing %s: write buffer above %d bytes (slow consumer)",
            self._peername,
            self.max_write_buffer,
        )
        self._close_exc = ProtocolError(ErrorCode.SLOW_CONSUMER, "peer does not read fast enough")
        self._closing = True
        self._out = bytearray()
        if self.transport is not None:
            self.transport.abort()  # close() would keep trying to flush the huge buffer

    async def request(self, type: str, body: dict[str, Any], timeout: float | None = 10.0) -> Message:
        """Send a request and wait for its reply (RESPONSE, WELCOME, REDIRECT or REJECT).

        Raises RemoteError for an ERROR reply, asyncio.TimeoutError after ``timeout``
        seconds, ConnectionError if the connection closes first.
        """
        if self._closing:
            raise ConnectionError("connection closed")
        rid = self._next_rid
        self._next_rid = rid + 1 if rid + 1 < _RID_LIMIT else 1
        fut = self._loop.create_future()  # type: ignore[union-attr]
        self._pending[rid] = fut
        try:
            self.send(type, body, rid)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    def respond(self, request: Message, body: dict[str, Any], type: str = "RESPONSE") -> None:
        """Answer ``request`` (the reply carries its rid)."""
        self.send(type, body, request.rid)

    def respond_error(
        self, request: Message | None, code: str, message: str, fatal: bool = False
    ) -> None:
        """Send ERROR for ``request`` (rid 0 if None). A fatal error is followed by a close."""
        body: dict[str, Any] = {"code": code, "message": message}
        if fatal:
            body["fatal"] = True
        self.send("ERROR", body, request.rid if request is not None else 0)

    def fail(self, code: str, message: str) -> None:
        """Protocol violation: send ERROR{fatal}, flush it, close the transport."""
        if self._closing:
            return
        self.respond_error(None, code, message, fatal=True)
        self._flush()
        if self._closing:  # the flush found a slow consumer and aborted
            return
        self._close_exc = ProtocolError(code, message)
        self.close()

    async def drain(self) -> None:
        """Wait until the transport accepts more data (flow control).

        Flushes our own buffer first once it is large, so that a producer calling
        ``send(); await drain()`` in a loop stays bounded. Raises ConnectionError if closed.
        """
        if self._closing:
            raise ConnectionError("connection closed")
        if len(self._out) >= _DRAIN_FLUSH_THRESHOLD:
            self._flush()
        if not self._paused:
            return
        fut = self._loop.create_future()  # type: ignore[union-attr]
        self._drain_waiters.append(fut)
        await fut

    def close(self) -> None:
        """Flush what is queued and close; on_close follows when the transport is gone."""
        if self._closing:
            return
        self._flush()
        self._closing = True
        self._cancel_idle()
        if self.transport is not None:
            self.transport.close()

    @property
    def closed(self) -> bool:
        """True once close() was called or the connection was lost."""
        return self._closing

    async def wait_closed(self) -> None:
        """Return when the connection is gone (connection_lost has run)."""
        if self._lost:
            return
        fut = asyncio.get_running_loop().create_future()
        self._closed_waiters.append(fut)
        await fut

    @property
    def peername(self) -> Any:
        """The peer's address as reported by the transport."""
        return self._peername

    # ---- idle watch (heartbeat / handshake timeouts) ------------------------------------
    def watch_idle(self, timeout: float | None, code: str = ErrorCode.HEARTBEAT_TIMEOUT) -> None:
        """Fail the connection with ``code`` if no frame arrives for ``timeout`` seconds.

        A server calls ``watch_idle(handshake_timeout, HANDSHAKE_TIMEOUT)`` on connect and
        ``watch_idle(heartbeat_timeout)`` after WELCOME; ``None`` stops watching. Uses one
        timer handle, re-armed lazily from ``last_received``, so it costs nothing per frame.
        """
        self._cancel_idle()
        self._idle_timeout = timeout
        self._idle_code = code
        if timeout is not None and not self._closing and self._loop is not None:
            self._idle_handle = self._loop.call_at(self.last_received + timeout, self._check_idle)

    def _cancel_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _check_idle(self) -> None:
        self._idle_handle = None
        timeout = self._idle_timeout
        if timeout is None or self._closing:
            return
        deadline = self.last_received + timeout
        if self._loop.time() >= deadline:  # type: ignore[union-attr]
            log.warning("closing %s: nothing received for %.1f s", self._peername, timeout)
            self.fail(self._idle_code, f"nothing received for {timeout:g} s")
        else:
            self._idle_handle = self._loop.call_at(deadline, self._check_idle)  # type: ignore[union-attr]
