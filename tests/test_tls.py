"""TLS end to end: a real ``fastjob-server`` process with ``--tls-cert/--tls-key``, real workers.

The certificates come from a throw-away CA made by ``trustme`` (a dev dependency: imported
normally, so a missing package is an error, not a skip). The server's certificate names the
IP address 127.0.0.1, which is what a worker connecting to ``127.0.0.1:port`` checks.
"""
from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from harness import FAST_CLUSTER_ARGS, next_event, wait_until

from fastjob import Worker, WorkerError
from fastjob.protocol import PROTOCOL_VERSION, Decoder, ProtocolError, encode, parse_address

APP = "secure-app"
REFUSED_WITHIN = 1.0  # a worker that cannot register must still not have registered by then
# (one that can registers in about a tenth of that)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    """(certificate chain, private key) files of a server certificate for 127.0.0.1."""
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert.private_key_pem.write_to_path(str(key_path))
    for i, pem in enumerate(cert.cert_chain_pems):  # leaf first, then intermediates
        pem.write_to_path(str(cert_path), append=i > 0)
    return str(cert_path), str(key_path)


@pytest.fixture
def trusting_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client context as a deployment would make it: verifies the server, trusts our CA."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(context)
    return context


async def start_tls_server(servers: Any, sqlite_url: str, tls_files: tuple[str, str]) -> Any:
    cert_path, key_path = tls_files
    return await servers.start(sqlite_url, "--tls-cert", cert_path, "--tls-key", key_path, *FAST_CLUSTER_ARGS)


async def test_worker_runs_a_job_over_tls(servers, sqlite_url, tls_files, trusting_context) -> None:
    server = await start_tls_server(servers, sqlite_url, tls_files)
    ran: asyncio.Queue[Any] = asyncio.Queue()
    worker = Worker(app=APP, servers=[server.address], ssl=trusting_context, reconnect_max=0.5)

    @worker.handler("echo")
    async def echo(ctx: Any) -> Any:
        ran.put_nowait((ctx.instance_id, ctx.params))
        return {"echo": ctx.params}

    worker.schedule("echo")  # no schedule: fired by trigger only
    try:
        await worker.start(timeout=10)
        conn = worker._conn
        assert conn is not None and conn.transport is not None
        tls = conn.transport.get_extra_info("ssl_object")
        assert tls is not None, "the worker's connection is not TLS"
        assert ("IP Address", "127.0.0.1") in tls.getpeercert()["subjectAltName"]

        instance_id = await worker.trigger("echo", {"n": 7, "s": "über"})
        assert await next_event(ran, 10) == (instance_id, {"n": 7, "s": "über"})

        async def succeeded() -> Any:
            row = await worker.get_instance(instance_id)
            return row if row["status"] == "succeeded" else None

        row = await wait_until(succeeded, 10, f"instance {instance_id} succeeded")
        assert row["app"] == APP and row["worker"] == worker.worker_id
        assert row["params"] == {"n": 7, "s": "über"}
        assert row["result"] == {"echo": {"n": 7, "s": "über"}}
    finally:
        await worker.stop(grace=1)
    assert server.running  # the server outlived the session


async def test_workers_that_cannot_speak_tls_to_the_server_do_not_register(
    servers, sqlite_url, tls_files, trusting_context
) -> None:
    server = await start_tls_server(servers, sqlite_url, tls_files)
    host, port = parse_address(server.address)

    # a client that does not trust the CA refuses the server's certificate
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl.create_default_context()), 5)

    # a plain-TCP client's HELLO is not a TLS handshake: the server hangs up, no WELCOME
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        writer.write(encode("HELLO", {"version": PROTOCOL_VERSION, "app": APP, "worker_id": "plain"}, rid=1))
        try:
            answer = await asyncio.wait_for(reader.read(), 5)  # returns at EOF: the server closed
        except ConnectionResetError:
            answer = b""
    finally:
        writer.close()
    try:
        msgs = Decoder().feed(answer)
    except ProtocolError:  # a TLS alert record is not a frame
        msgs = []
    assert [m for m in msgs if m.type == "WELCOME"] == []

    # the same with real workers: they retry until their start() bound, and never register
    async def refused(label: str, context: Any) -> None:
        worker = Worker(app=APP, servers=[server.address], ssl=context, worker_id=label,
                        connect_timeout=REFUSED_WITHIN, reconnect_min=0.05, reconnect_max=0.2)
        try:
            with pytest.raises((asyncio.TimeoutError, WorkerError)):
                await worker.start(timeout=REFUSED_WITHIN)
            assert not worker.connected, label
        finally:
            await worker.stop(grace=0)

    untrusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # system CAs only
    await asyncio.gather(refused("untrusting-tls", untrusting), refused("plain-tcp", None))

    # the server is fine, and a worker that trusts the CA still registers
    assert server.running
    good = Worker(app=APP, servers=[server.address], ssl=trusting_context, reconnect_max=0.5)
    try:
        await good.start(timeout=10)
        assert good.connected
        assert await good.list_jobs() == []
    finally:
        await good.stop(grace=0)
