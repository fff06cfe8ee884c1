"""``fastjob-server``: command-line flags, each also a ``FASTJOB_…`` environment variable."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..store import DEFAULT_URL, StoreError, create_store
from . import logfmt
from .app import FastJobServer
from .auth import ROLES, TokenAuthority
from .config import ServerConfig

log = logging.getLogger("fastjob.server")


def _env(name: str, default: Any) -> Any:
    """FASTJOB_<NAME> from the environment (a string), else ``default``."""
    return os.environ.get("FASTJOB_" + name.upper().replace("-", "_"), default)


#: argparse converters of the config's field types (annotations are strings here).
_CONVERTERS: dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float}


def _add_knob(p: argparse.ArgumentParser, knob: dataclasses.Field[Any]) -> None:
    """One config field as ``--its-name``, defaulting to FASTJOB_ITS_NAME, else the field's default."""
    convert = _CONVERTERS[str(knob.type).removesuffix(" | None")]
    raw = _env(knob.name, None)
    try:
        default = knob.default if raw is None else convert(raw)
    except ValueError:
        raise SystemExit(f"FASTJOB_{knob.name.upper()}={raw!r} is not a valid {convert.__name__}") from None
    shown = "none" if knob.default is None else knob.default
    p.add_argument("--" + knob.name.replace("_", "-"), type=convert, default=default,
                   help=f"{knob.metadata['help']} (default: {shown}; FASTJOB_{knob.name.upper()})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastjob-server", description="Run a FastJob scheduling server.",
        epilog="fastjob-server drain SERVER_ID --db URL [--undo]: ask a running server to hand its apps to the"
               " other servers (before maintenance); --undo lets it take apps again. SIGTERM also hands apps"
               " over before the server exits. fastjob-server token create|list|revoke --db URL: manage tokens.")
    for knob in dataclasses.fields(ServerConfig):
        if knob.type == "bool":
            p.add_argument("--" + knob.name.replace("_", "-"), action="store_true",
                           default=_env(knob.name, "") in ("1", "true", "yes"),
                           help=f"{knob.metadata['help']} (default: off; FASTJOB_{knob.name.upper()}=1)")
        elif knob.name == "app_tokens":
            p.add_argument("--app-token", action="append", default=[], metavar="APP=TOKEN",
                           help=knob.metadata["help"] + " (default: none)")
        elif knob.name == "alarm_webhooks":
            p.add_argument("--alarm-webhook", action="append", default=[], metavar="[FORMAT=]URL",
                           help=knob.metadata["help"] + " (default: none)")
        elif knob.name == "retain_app":
            p.add_argument("--retain-app", action="append", default=[], metavar="APP=DURATION",
                           help=knob.metadata["help"] + " (default: none)")
        else:
            _add_knob(p, knob)
    return p


def _app_pairs(flag: str, pairs: list[str], variable: str, value_name: str) -> dict[str, str]:
    """APP=VALUE pairs of a repeatable flag and of its comma-separated variable."""
    values = {}
    for pair in pairs + [pair for pair in os.environ.get(variable, "").split(",") if pair]:
        app, sep, value = pair.partition("=")
        if not sep or not app or not value:
            raise SystemExit(f"--{flag} wants APP={value_name}, got {pair!r}")
        values[app] = value
    return values


def parse_config(argv: Sequence[str] | None = None) -> ServerConfig:
    args = vars(build_parser().parse_args(argv))
    args["app_tokens"] = _app_pairs("app-token", args.pop("app_token"), "FASTJOB_APP_TOKENS", "TOKEN")
    args["alarm_webhooks"] = args.pop("alarm_webhook") + [
        url for url in os.environ.get("FASTJOB_ALARM_WEBHOOKS", "").split(",") if url]
    args["retain_app"] = _app_pairs("retain-app", args.pop("retain_app"), "FASTJOB_RETAIN_APP", "DURATION")
    config = ServerConfig(**args)
    problems = config.check()
    if problems:
        raise SystemExit(problems[0])
    return config


def _refuse(message: str) -> None:
    """A setting the server cannot start with: one line on stderr, exit status 2 (as argparse does)."""
    print(f"fastjob-server: {message}", file=sys.stderr)
    raise SystemExit(2)


async def serve(config: ServerConfig, formatter: logging.Formatter | None = None) -> None:
    """Run until SIGTERM/SIGINT, then stop cleanly (release apps, flush writes)."""
    server = FastJobServer(config)
    address = await server.start()
    if isinstance(formatter, logfmt.JsonFormatter):
        formatter.server = server.server_id
    if server.http is not None:
        print(f"FASTJOB_HTTP {server.http.address}", flush=True)
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
    try:
        found = asyncio.run(request_drain(args.db, args.server_id, not args.undo))
    except (ValueError, StoreError) as exc:
        _refuse(f"--db: {exc}")
    if not found:
        raise SystemExit(f"no server {args.server_id!r} in {args.db.split('@')[-1]}")
    print(f"server {args.server_id}: drain {'cleared' if args.undo else 'requested'}")


def build_token_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastjob-server token", description="Manage API and worker tokens in the"
                                " cluster's database (the API's /api/v1/tokens does the same).")
    p.add_argument("--db", default=_env("db", DEFAULT_URL), help="the cluster's database URL")
    sub = p.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a token; it is printed alone on the last line, once")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--app", action="append", default=None, help="an app it may act on (repeatable;"
                                                                       " default: every app)")
    create.add_argument("--name", default=None, help="who holds it, for the audit log (default: the role)")
    create.add_argument("--expires-in", type=float, default=None, metavar="SECONDS")
    sub.add_parser("list", help="every token, without secrets")
    revoke = sub.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("token_id")
    return p


async def _token_command(args: argparse.Namespace) -> None:
    store = create_store(args.db)
    await store.open()
    try:
        auth = TokenAuthority(store)
        if args.command == "create":
            expires = None if args.expires_in is None else time.time() + args.expires_in
            token, row = await auth.create(args.name or args.role, args.role, args.app, expires)
            print(f"created {row.role} token {row.id} for {', '.join(row.apps) if row.apps else 'every app'}")
            print(token)
        elif args.command == "list":
            for row in await store.list_tokens():
                state = "revoked" if row.revoked_at else "expired" if row.expires_at and row.expires_at < time.time() \
                    else "active"
                print(f"{row.id}  {row.role:<8}  {state:<7}  {','.join(row.apps) if row.apps else '*':<20}  {row.name}")
        elif not await auth.revoke(args.token_id):
            raise SystemExit(f"no active token {args.token_id!r}")
        else:
            print(f"token {args.token_id} revoked")
    finally:
        await store.close()


def token_main(argv: Sequence[str]) -> None:
    args = build_token_parser().parse_args(argv)
    try:
        asyncio.run(_token_command(args))
    except (ValueError, StoreError) as exc:
        _refuse(f"--db: {exc}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["drain"]:
        drain_main(argv[1:])
        return
    if argv[:1] == ["token"]:
        token_main(argv[1:])
        return
    try:
        config = parse_config(argv)
    except SystemExit as refused:
        if isinstance(refused.code, str):
            _refuse(refused.code)
        raise
    formatter = logfmt.configure(config.log_level, config.log_format, config.server_id or config.advertise or "")
    try:
        import uvloop
    except ImportError:
        run: Callable[[Any], None] = asyncio.run
    else:
        run = uvloop.run
    try:
        run(serve(config, formatter))
    except StoreError as exc:  # the database could not be opened: the store said why, and retried first
        _refuse(f"--db: {exc}")


if __name__ == "__main__":
    main()
