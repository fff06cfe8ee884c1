"""The shared connection: an :class:`asyncio.Protocol` base for the server and the worker.

Write coalescing (one ``transport.write`` per loop iteration), flow control, request/response
correlation and idle (heartbeat / handshake) watching, on top of the codec.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from .codec import Decoder, Message, _pack_header, _packb
from .constants import DEFAULT_MAX_FRAME
from .errors import ErrorCode, ProtocolError, RemoteError
from .schema import REPLY_TYPES

log = logging.getLogger("fastjob.protocol")  # the logger's name from before the split

_RID_LIMIT = 1 << 32
#: Frames in, bytes in, frames out, bytes out, over every connection of this process (the
#: metrics read it; a list of ints costs a frame two additions and no lock).
TRAFFIC = [0, 0, 0, 0]
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
        self.closed_by_peer = False  # set when the connection is lost: the peer (not we) closed it
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

    @property
    def _live_loop(self) -> asyncio.AbstractEventLoop:
        """The loop, once the connection is made (nothing that needs it runs before)."""
        assert self._loop is not None, "connection not made yet"
        return self._loop

    # ---- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport: TCP or TLS
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
        TRAFFIC[1] += len(data)
        if not msgs:
            return
        TRAFFIC[0] += len(msgs)
        self.last_received = self._live_loop.time()
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
        # the peer closed it or the network broke it (we had not begun to close it ourselves)
        self.closed_by_peer = not self._closing
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
        TRAFFIC[2] += 1
        TRAFFIC[3] += size + 4
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
        fut = self._live_loop.create_future()
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
        fut = self._live_loop.create_future()
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

    def silent_for(self) -> float:
        """Seconds since the peer's last frame."""
        return self._live_loop.time() - self.last_received

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
        loop = self._live_loop
        if loop.time() >= deadline:
            log.warning("closing %s: nothing received for %.1f s", self._peername, timeout)
            self.fail(self._idle_code, f"nothing received for {timeout:g} s")
        else:
            self._idle_handle = loop.call_at(deadline, self._check_idle)
