"""A server frozen inside a transaction does not hold up its successor (MariaDB).

A process stopped between its fence (which locks the app row) and its COMMIT keeps that lock
for as long as its connection lives, and a frozen process's connection lives on. The survivor
ends the dead server's database sessions before its takeover CAS, which would otherwise wait
for InnoDB's lock wait timeout (50 s by default) and then fail.
"""
from __future__ import annotations

import asyncio
import time

import pymysql
import pytest
from harness import wait_until

from fastjob.server.app import FastJobServer, ServerConfig
from fastjob.store.mysql import MySQLStore

pytestmark = pytest.mark.mysql


async def _frozen_in_a_transaction(dsn: str) -> tuple[MySQLStore, object]:
    """A dead server ("frozen", heartbeat a minute old) that owns "shop" and stopped inside a
    transaction holding the app row's lock; returns its store and that open connection."""
    store = MySQLStore.from_url(dsn + "?pool_max=1&pool_min=1")
    await store.open()
    await store.register_server("frozen", "127.0.0.1:1", time.time() - 60)
    await store.ensure_app("shop")
    assert await store.claim_app("shop", "frozen", 0) is not None
    conn = await store._pool.acquire()  # the one connection, recorded as the frozen server's
    await conn.begin()
    async with conn.cursor() as cur:
        await cur.execute("UPDATE apps SET updated_at = %s WHERE name = 'shop'", (time.time(),))
    return store, conn


async def test_the_survivor_ends_a_frozen_owners_sessions_and_takes_its_app(mysql_dsn):
    frozen, conn = await _frozen_in_a_transaction(mysql_dsn)
    srv = FastJobServer(ServerConfig(host="127.0.0.1", port=0, http_port=0, db=mysql_dsn, heartbeat_interval=0.2,
                                     heartbeat_timeout=1.0))
    await srv.start()
    try:
        await wait_until(lambda: "shop" in srv.cluster.owned, 20, "the survivor to take the app")
        with pytest.raises(pymysql.err.OperationalError):  # its transaction ended with its session
            await asyncio.wait_for(conn.commit(), 10)
    finally:
        conn.close()
        frozen._pool.release(conn)  # closing the pool waits for every acquired connection
        await asyncio.wait_for(srv.stop(), 30)
        await asyncio.wait_for(frozen.close(), 10)


async def test_fencing_spares_our_own_and_forgets_a_removed_servers_sessions(mysql_dsn):
    store = MySQLStore.from_url(mysql_dsn + "?pool_max=1")
    await store.open()
    try:
        await store.register_server("me", "127.0.0.1:1", time.time())
        assert await store.fence_server("me") == 0
        assert await store.fence_server("nobody") == 0
        assert len(await store._run("t", lambda: store._op_query("SELECT conn_id FROM db_sessions"), tx=False)) == 1
        await store.remove_server("me")
        assert await store._run("t", lambda: store._op_query("SELECT conn_id FROM db_sessions"), tx=False) == []
    finally:
        await store.close()


async def test_a_session_recorded_before_the_database_started_is_never_killed(mysql_dsn):
    """Session ids start again from 1 after a database restart: an old row may name a live
    session of somebody else now."""
    store = MySQLStore.from_url(mysql_dsn + "?pool_max=2")
    await store.open()
    bystander = await store._pool.acquire()  # the store's other connection stays free for its own calls
    try:
        async with bystander.cursor() as cur:
            await cur.execute("SELECT CONNECTION_ID()")
            (conn_id,) = await cur.fetchone()
            await cur.execute("INSERT INTO db_sessions (conn_id, server_id, opened_at) VALUES (%s, 'gone', 0)",
                              (conn_id,))
        assert await store.fence_server("gone") == 0
        async with bystander.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM db_sessions WHERE server_id = 'gone'")
            assert (await cur.fetchone())[0] == 0  # the stale row is gone, the session lives on
    finally:
        store._pool.release(bystander)
        await store.close()
