"""Protocol throughput: pipelined DISPATCH -> ACK round trips between two processes.

    python bench/bench_protocol.py            # full run (a few seconds per case)
    python bench/bench_protocol.py --quick    # short run

For each event loop (uvloop, asyncio) two servers run in a child process:

* ``echo``    - a bare asyncio.Protocol that writes back whatever it reads. The client sends
                pre-encoded DISPATCH frames in batches and waits for the same number of bytes
                back. No framing, no msgpack: this is the transport's ceiling.
* ``fastjob`` - a fastjob.protocol.Connection: every DISPATCH is decoded and validated, and
                answered with an ACK frame; the client encodes each DISPATCH and decodes and
                validates each ACK.
* ``streams`` - the same work written naively on StreamReader.readexactly per frame (shown
                for comparison with the design the issue rejects).
* ``msgpack echo`` - a bare asyncio.Protocol that splits the stream into frames, msgpack-decodes
                each and re-encodes it, and writes it back; the client is the echo client. This is
                what any msgpack protocol pays, with none of fastjob's own work (envelope, schema
                check, dispatch to a handler): the target is fastjob >= 60% of it on uvloop.

Both keep ``--depth`` batches of ``--batch`` frames in flight. The figure is completed round
trips (messages) per second; the ratio fastjob/echo is what the target (>= 80% on uvloop)
refers to.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _figures import add_json_option, figure, write  # noqa: E402

from fastjob.protocol import HEADER, Connection, Message, encode, validate  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

DISPATCH = {
    "instance_id": 123456789,
    "job_id": 42,
    "job": "send-report",
    "handler": "reports.send_daily",
    "params": {"region": "eu", "limit": 100},
    "attempt": 1,
    "scheduled_at": 1700000000.0,
    "timeout": 30.0,
}


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()


# ---- server side (child process) ------------------------------------------------------------


class EchoServer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class MsgpackEchoServer(asyncio.Protocol):
    """Frames, msgpack.unpackb and msgpack.packb per frame, written back in one write per read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(buf, pos)
            if end - pos - 4 < size:
                break
            payload = msgpack.packb(msgpack.unpackb(memoryview(buf)[pos + 4:pos + 4 + size]))
            out += (HEADER.pack(len(payload)), payload)
            pos += 4 + size
        del buf[:pos]
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]


class AckServer(Connection):
    def on_message(self, msg: Message) -> None:
        if msg.type == "DISPATCH":
            self.send("ACK", {"instance_id": msg.body["instance_id"], "accepted": True})


async def read_frame(reader: asyncio.StreamReader) -> Message:
    (size,) = HEADER.unpack(await reader.readexactly(4))
    mtype, rid, body = msgpack.unpackb(await reader.readexactly(size))
    validate(mtype, body)
    return Message(mtype, rid, body)


async def streams_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            msg = await read_frame(reader)
            writer.write(encode("ACK", {"instance_id": msg.body["instance_id"], "accepted": True}))
    except asyncio.IncompleteReadError:
        writer.close()


def serve(kind: str, mode: str, port_out: Any) -> None:
    loop = new_loop(kind)
    asyncio.set_event_loop(loop)
    if mode == "streams":
        server = loop.run_until_complete(asyncio.start_server(streams_server, "127.0.0.1", 0))
    else:
        factories: dict[str, Callable[[], asyncio.Protocol]] = {
            "echo": EchoServer, "msgpack echo": MsgpackEchoServer, "fastjob": AckServer}
        factory = factories[mode]
        server = loop.run_until_complete(loop.create_server(factory, "127.0.0.1", 0))
    port_out.send(server.sockets[0].getsockname()[1])
    port_out.close()
    loop.run_forever()


# ---- client side ----------------------------------------------------------------------------


class EchoClient(asyncio.Protocol):
    """Sends pre-encoded frames and counts bytes coming back."""

    def __init__(self, frame: bytes, batch: int) -> None:
        self.batch_bytes = frame * batch
        self.batch = batch
        self.expected = 0
        self.received = 0
        self.done: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send_batch(self) -> None:
        self.transport.write(self.batch_bytes)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= self.expected and self.done and not self.done.done():
            self.done.set_result(None)


class AckClient(Connection):
    """Encodes each DISPATCH, decodes each ACK."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.acked = 0
        self.expected = 0
        self.next_id = 0
        self.done: asyncio.Future | None = None

    def send_batch(self) -> None:
        body = dict(DISPATCH)
        send = self.send
        for _ in range(self.batch):
            self.next_id += 1
            body["instance_id"] = self.next_id
            send("DISPATCH", body)

    def on_message(self, msg: Message) -> None:
        self.acked += 1
        if self.acked >= self.expected and self.done and not self.done.done():
            self.done.set_result(None)


async def drive(client: Any, unit: int, batches: int, depth: int) -> float:
    """Keep ``depth`` batches in flight until ``batches`` are complete; return seconds taken."""
    loop = asyncio.get_running_loop()
    in_flight = min(depth, batches)
    sent = 0
    t0 = time.perf_counter()
    for _ in range(in_flight):
        client.send_batch()
    sent = in_flight
    completed = 0
    while completed < batches:
        client.expected = (completed + 1) * unit
        client.done = loop.create_future()
        counter = client.received if isinstance(client, EchoClient) else client.acked
        if counter < client.expected:
            await client.done
        completed += 1
        if sent < batches:
            client.send_batch()
            sent += 1
    return time.perf_counter() - t0


async def streams_client(port: int, batch: int, batches: int, depth: int) -> float:
    """Writer task keeps ``depth`` batches ahead of the reader, which reads ACKs one by one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    window = asyncio.Semaphore(depth)

    async def produce(n: int) -> None:
        body = dict(DISPATCH)
        for b in range(n):
            await window.acquire()
            for i in range(batch):
                body["instance_id"] = b * batch + i
                writer.write(encode("DISPATCH", body))
            await writer.drain()

    async def consume(n: int) -> None:
        for _ in range(n):
            for _ in range(batch):
                await read_frame(reader)
            window.release()

    async def one_run(n: int) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(produce(n), consume(n))
        return time.perf_counter() - t0

    await one_run(max(1, batches // 10))  # warm-up
    elapsed = await one_run(batches)
    writer.close()
    return batch * batches / elapsed


async def client_run(mode: str, port: int, batch: int, batches: int, depth: int) -> float:
    loop = asyncio.get_running_loop()
    frame = encode("DISPATCH", DISPATCH)
    if mode == "streams":
        return await streams_client(port, batch, batches, depth)
    if mode in ("echo", "msgpack echo"):
        _, client = await loop.create_connection(lambda: EchoClient(frame, batch), "127.0.0.1", port)
        unit = len(frame) * batch
    else:
        _, client = await loop.create_connection(lambda: AckClient(batch), "127.0.0.1", port)
        unit = batch
    await drive(client, unit, max(1, batches // 10), depth)  # warm-up
    if isinstance(client, EchoClient):
        client.received = 0
    else:
        client.acked = 0
    elapsed = await drive(client, unit, batches, depth)
    client.transport.close()
    return batch * batches / elapsed


def measure(kind: str, mode: str, batch: int, batches: int, depth: int) -> float:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=serve, args=(kind, mode, send), daemon=True)
    proc.start()
    try:
        if not recv.poll(30):
            raise RuntimeError("server process did not start")
        port = recv.recv()
        loop = new_loop(kind)
        try:
            return loop.run_until_complete(client_run(mode, port, batch, batches, depth))
        finally:
            loop.close()
    finally:
        proc.terminate()
        proc.join(5)


def cpu_costs(n: int) -> str:
    """Single-process cost per message, to show how much of it is msgpack itself."""
    import timeit

    from fastjob.protocol import Decoder

    frame = encode("DISPATCH", DISPATCH)
    payload = frame[4:]
    batch = frame * 100
    dec = Decoder()
    reps = max(1, n // 100)
    per = lambda fn, count: min(timeit.repeat(fn, number=count, repeat=3)) / count * 1e6  # noqa: E731
    return (
        f"per message, one process: encode {per(lambda: encode('DISPATCH', DISPATCH), n):.2f} us "
        f"(msgpack.packb {per(lambda: msgpack.packb(['DISPATCH', 0, DISPATCH]), n):.2f}), "
        f"decode+validate {per(lambda: dec.feed(batch), reps) / 100:.2f} us "
        f"(msgpack.unpackb {per(lambda: msgpack.unpackb(payload), n):.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run")
    parser.add_argument("--batch", type=int, default=100, help="frames per batch (default 100)")
    parser.add_argument("--depth", type=int, default=2, help="batches in flight (default 2)")
    parser.add_argument("--messages", type=int, default=0, help="messages per case")
    parser.add_argument("--repeat", type=int, default=0, help="runs per case; the best is shown")
    add_json_option(parser)
    args = parser.parse_args()
    messages = args.messages or (100_000 if args.quick else 300_000)
    repeat = args.repeat or (1 if args.quick else 2)
    batches = max(1, messages // args.batch)
    frame_size = len(encode("DISPATCH", DISPATCH))
    ack_size = len(encode("ACK", {"instance_id": 123456789, "accepted": True}))
    print(
        f"DISPATCH frame {frame_size} B, ACK frame {ack_size} B; batch {args.batch} frames, "
        f"depth {args.depth}, {batches * args.batch} round trips per run, best of {repeat}"
    )
    print(cpu_costs(20_000 if args.quick else 100_000))
    payload = encode("DISPATCH", DISPATCH)[4:]
    assert msgpack.packb(msgpack.unpackb(payload)) == payload, "msgpack echo sends back as many bytes as it read"
    kinds = (["uvloop"] if uvloop else []) + ["asyncio"]
    figs = []
    for kind in kinds:
        rates = {}
        for mode in ("echo", "fastjob", "streams", "msgpack echo"):
            rates[mode] = max(measure(kind, mode, args.batch, batches, args.depth) for _ in range(repeat))
        print(
            f"{kind:8s} echo (ceiling) {rates['echo']:>10,.0f} msg/s   "
            f"fastjob {rates['fastjob']:>9,.0f} msg/s ({rates['fastjob'] / rates['echo']:6.1%})   "
            f"naive streams {rates['streams']:>9,.0f} msg/s ({rates['streams'] / rates['echo']:6.1%})"
        )
        mp_rate = rates["msgpack echo"]
        print(f"{kind:8s} msgpack echo (decode + re-encode per frame) {mp_rate:>9,.0f} msg/s   fastjob / msgpack echo "
              f"{rates['fastjob'] / mp_rate:6.1%}" + ("   (target >= 60%)" if kind == "uvloop" else ""))
        figs += [figure(f"protocol {kind}", "fastjob vs msgpack echo", rates["fastjob"], "msg/s", baseline=mp_rate,
                        ratio_min=0.6 if kind == "uvloop" else None),
                 figure(f"protocol {kind}", "fastjob vs bare echo", rates["fastjob"], "msg/s", baseline=rates["echo"])]
    write(args.json, figs)


if __name__ == "__main__":
    main()
