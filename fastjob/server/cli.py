"""``fastjob-server``: command-line flags, each also a ``FASTJOB_…`` environment variable."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ..store import DEFAULT_URL, create_store
from .app import FastJobServer, ServerConfig

log = logging.getLogger("fastjob.server")


def _env(name: str, default: Any) -> Any:
    """FASTJOB_<NAME> from the environment (a string), else ``default``."""
    return os.environ.get("FASTJOB_" + name.upper().replace("-", "_"), default)


def _float_or_none(value: object) -> float | None:
    return None if value is None else float(str(value))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastjob-server", description="Run a FastJob scheduling server.",
        epilog="fastjob-server drain SERVER_ID --db URL [--undo]: ask a running server to hand its apps to the"
               " other servers (before maintenance); --undo lets it take apps again. SIGTERM also hands apps"
               " over before the server exits.")
    p.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to bind (FASTJOB_HOST)")
    p.add_argument("--port", type=int, default=int(_env("port", 7700)), help="port to bind; 0 picks a free one")
    p.add_argument("--db", default=_env("db", DEFAULT_URL), help="sqlite:///path.db (default) or mysql://user:pass@host:port/db")
    p.add_argument("--advertise", default=_env("advertise", None), help="host:port other servers redirect workers to")
    p.add_argument("--server-id", default=_env("server_id", None), help="stable id (default: the advertised address)")
    p.add_argument("--log-level", default=_env("log_level", "INFO"))
    p.add_argument("--heartbeat-interval", type=float, default=float(_env("heartbeat_interval", 2.0)))
    p.add_argument("--heartbeat-timeout", type=float, default=float(_env("heartbeat_timeout", 10.0)),
                   help="a server or worker silent this long is dead; also the owner's lease")
    p.add_argument("--run-lease", type=float, default=_float_or_none(_env("run_lease", None)),
                   help="a worker that hears no owning server this long stops its running instances, which"
                        " then run again elsewhere (default: the heartbeat timeout)")
    p.add_argument("--status-flush-interval", type=float, default=float(_env("status_flush_interval", 0.02)),
                   help="seconds status changes gather into one batched database write")
    p.add_argument("--scan-horizon", type=float, default=float(_env("scan_horizon", 5.0)))
    p.add_argument("--dispatch-wait", type=float, default=float(_env("dispatch_wait", 30.0)),
                   help="seconds a due fire waits for a worker before it is failed")
    p.add_argument("--misfire-threshold", type=float, default=float(_env("misfire_threshold", 5.0)))
    p.add_argument("--second-level-threshold", type=float, default=float(_env("second_level_threshold", 60.0)),
                   help="fixed rate/delay jobs with a shorter period run on a worker")
    p.add_argument("--max-frame", type=int, default=int(_env("max_frame", 1 << 20)))
    p.add_argument("--tls-cert", default=_env("tls_cert", None))
    p.add_argument("--tls-key", default=_env("tls_key", None))
    p.add_argument("--app-token", action="append", default=[], metavar="APP=TOKEN",
                   help="require TOKEN from workers of APP (repeatable; FASTJOB_APP_TOKENS=a=x,b=y)")
    return p


def parse_config(argv: Sequence[str] | None = None) -> ServerConfig:
    args = build_parser().parse_args(argv)
    pairs = list(args.app_token)
    env_tokens = os.environ.get("FASTJOB_APP_TOKENS", "")
    pairs += [pair for pair in env_tokens.split(",") if pair]
    tokens = {}
    for pair in pairs:
        app, sep, token = pair.partition("=")
        if not sep or not app or not token:
            raise SystemExit(f"--app-token wants APP=TOKEN, got {pair!r}")
        tokens[app] = token
    if args.heartbeat_timeout <= args.heartbeat_interval:
        raise SystemExit("--heartbeat-timeout must be longer than --heartbeat-interval")
    if args.run_lease is not None and args.run_lease <= args.heartbeat_interval:
        raise SystemExit("--run-lease must be longer than --heartbeat-interval")
    if args.max_frame < 65536:
        raise SystemExit("--max-frame must be at least 65536 bytes (a worker's HELLO alone may need several KiB)")
    if not 0 < args.status_flush_interval <= 60:
        raise SystemExit("--status-flush-interval must be in (0, 60] seconds")
    return ServerConfig(
        host=args.host, port=args.port, db=args.db, advertise=args.advertise, server_id=args.server_id,
        log_level=args.log_level, heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout, run_lease=args.run_lease,
        status_flush_interval=args.status_flush_interval,
        scan_horizon=args.scan_horizon,
        dispatch_wait=args.dispatch_wait, misfire_threshold=args.misfire_threshold,
        second_level_threshold=args.second_level_threshold, max_frame=args.max_frame,
        tls_cert=args.tls_cert, tls_key=args.tls_key, app_tokens=tokens,
    )


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then stop cleanly (release apps, flush writes)."""
    server = FastJobServer(config)
    address = await server.start()
    print(f"FASTJOB_READY {address}", flush=True)  # test harnesses wait for this line
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: shutting down")
    await server.stop()


def build_drain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastjob-server drain",
                                description="Ask a running server to hand its apps to the others (it keeps running"
                                            " and takes no apps until --undo).")
    p.add_argument("server_id", help="the server's id (its advertised host:port unless --server-id was given)")
    p.add_argument("--db", default=_env("db", DEFAULT_URL), help="the cluster's database URL")
    p.add_argument("--undo", action="store_true", help="let the server take apps again")
    return p


async def request_drain(db: str, server_id: str, drain: bool) -> bool:
    """Set the server's drain flag; it acts on it at its next heartbeat."""
    store = create_store(db)
    await store.open()
    try:
        return await store.set_server_drain(server_id, drain)
    finally:
        await store.close()


def drain_main(argv: Sequence[str]) -> None:
    args = build_drain_parser().parse_args(argv)
    if not asyncio.run(request_drain(args.db, args.server_id, not args.undo)):
        raise SystemExit(f"no server {args.server_id!r} in {args.db.split('@')[-1]}")
    print(f"server {args.server_id}: drain {'cleared' if args.undo else 'requested'}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["drain"]:
        drain_main(argv[1:])
        return
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))


if __name__ == "__main__":
    main()
