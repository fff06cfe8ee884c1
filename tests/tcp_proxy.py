"""A TCP proxy that can cut the line: database outages for tests and benchmarks.

Servers reach the database through the proxy; ``cut()`` makes the database unreachable for
them without touching the database itself (other test runs share it), and ``restore()``
brings it back. Two ways to be unreachable: ``"refuse"`` closes every connection and refuses
new ones (a database that went down), ``"blackhole"`` keeps connections open but forwards
nothing (a partition: reads and writes hang until the peer's own timeout).
"""
from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``, with a switch."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.mode = "open"  # or "refuse", "blackhole"
        self._server: asyncio.base_events.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._drop_all()
        if self._pipes:
            await asyncio.wait(self._pipes, timeout=5)

    async def cut(self, mode: str = "refuse") -> None:
        """Make the target unreachable through the proxy. "refuse" resets every connection, open or
        new; the port stays bound (released, another process on the machine could take it before
        ``restore`` binds it again)."""
        assert mode in ("refuse", "blackhole")
        self.mode = mode
        if mode == "refuse":
            self._drop_all()

    async def restore(self) -> None:
        """Forward again (on the same port); connections held in a black hole are dropped."""
        if self.mode == "blackhole":
            self._drop_all()
        self.mode = "open"
        if self._server is None:
            await self.start(self.port)

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.transport.abort()
            return
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                while self.mode == "blackhole":  # hold the bytes: the peer sees silence
                    await asyncio.sleep(0.05)
                    if dst.transport.is_closing():
                        return
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.transport.abort()
            self._writers.discard(dst)
