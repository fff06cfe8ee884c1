"""Framing: length-prefixed msgpack frames, ``[type, rid, body]`` envelopes.

:func:`encode` builds one frame; :class:`Decoder` is incremental (many frames per read, frames
split across reads), never buffers more than ``max_frame + 4`` bytes, and checks every
envelope and body against the schemas. Pure bytes in, messages out: no I/O, no event loop.
:func:`parse_address` reads the ``host:port`` form in which peers name each other.
"""
from __future__ import annotations

import struct
from typing import Any, NamedTuple

import msgpack

from .constants import DEFAULT_MAX_FRAME
from .errors import ErrorCode, ProtocolError
from .schema import _CHECKERS

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
