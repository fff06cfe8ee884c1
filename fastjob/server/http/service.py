"""The admin API's HTTP server: authentication, placement (here, or forwarded to the app's
owner), the audit log and errors around the views of the route table."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from ...protocol import parse_address
from ...store import NotOwnerError, StoreError
from ..auth import Principal
from ..config import is_loopback
from .backend import AdminBackend, Call, Owner
from .encode import json_response
from .errors import STATUS, HttpError
from .openapi import build_document
from .routes import ROUTES, Route
from .views_instances import PAGE_CACHE, TAILS, PageCache

log = logging.getLogger("fastjob.http")

#: Largest request body (a job with its params, a trigger's params).
MAX_BODY = 1 << 20
#: A request a peer forwarded to us as the app's owner carries this header; we never forward it again.
FORWARDED = "X-FastJob-Forwarded"
FORWARD_TIMEOUT = 15.0
_FORWARD_HEADERS = ("Authorization", "Idempotency-Key", "Content-Type")
_CODES = {status: code for code, status in STATUS.items()}


class AdminHttp:
    """Serves the route table on the scheduler's event loop."""

    def __init__(self, backend: AdminBackend) -> None:
        self.backend = backend
        self.app = build_app(backend, self)
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self.address = ""

    async def start(self, host: str, port: int) -> str:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or ()  # asyncio's or uvloop's Server
        bound = sockets[0].getsockname()[1] if sockets else port
        self.address = f"{host}:{bound}"
        return self.address

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def forward(self, request: web.Request, owner: Owner) -> web.Response:
        """Send the request to the app's owner and answer with its answer."""
        if not owner.http_address:
            raise HttpError("unavailable", f"the app's owner {owner.server_id} serves no admin API (--http-port -1)")
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT))
        host, port = parse_address(owner.http_address)
        headers = {name: request.headers[name] for name in _FORWARD_HEADERS if name in request.headers}
        headers[FORWARDED] = "1"
        body = await request.read()
        try:
            async with self._client.request(request.method, f"http://{host}:{port}{request.path_qs}",
                                            data=body or None, headers=headers) as answer:
                payload = await answer.read()
                return web.Response(body=payload, status=answer.status,
                                    content_type=answer.content_type or "application/json")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise HttpError("bad_gateway", f"the app's owner {owner.server_id} did not answer: "
                                           f"{type(exc).__name__} {exc}".strip()) from None


def build_app(backend: AdminBackend, service: AdminHttp) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors])
    app[PAGE_CACHE] = PageCache()
    app[TAILS] = [0]
    document = build_document()

    async def openapi(call: Call) -> dict[str, Any]:
        return document

    _console(app)
    for route in ROUTES:
        if route.path == "/api/v1/openapi.json":
            route = Route(route.method, route.path, openapi, route.summary, permission=None)
        app.router.add_route(route.method, route.path, _handler(route, backend, service))
    return app


#: The console's static files (plain JS on this API only), shipped in the package.
CONSOLE = Path(__file__).resolve().parent.parent / "console"
#: The console loads nothing from elsewhere, and runs no inline script.
CONSOLE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
                  " frame-ancestors 'none'")


def _console(app: web.Application) -> None:
    """The web console: its page at / and its files under /console/ (outside the API's route table)."""
    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(CONSOLE / "index.html", headers={
            "Content-Security-Policy": CONSOLE_POLICY, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache"})

    app.router.add_get("/", index)
    app.router.add_static("/console/", CONSOLE, name="console")


def _handler(route: Route, backend: AdminBackend, service: AdminHttp) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        if route.permission is None or (route.open_on_loopback and (
                backend.config.metrics_public or is_loopback(request.remote or ""))):
            principal = _NOBODY
        else:
            principal = await _authenticate(request, backend)
        call = Call(request, backend, principal, forwarded=request.headers.get(FORWARDED) == "1")
        app = call.app
        try:
            call.check_app()
            if route.placement != "any":
                if route.app_of is not None:
                    app = await route.app_of(call)
                assert route.permission is not None
                call.require(route.permission, app)  # before a claim or a forward
                if route.precheck is not None:
                    await route.precheck(call)
                owner = await backend.owner_of(app, claim=route.placement == "owner")
                if owner is not None and not owner.here:
                    if call.forwarded:
                        raise HttpError("unavailable", f"app {app!r} is changing hands; retry in a moment")
                    return await service.forward(request, owner)
            result = await route.view(call)
        except HttpError as exc:
            _audit(route, call, app, exc.code, exc.message)
            raise
        except NotOwnerError:
            _audit(route, call, app, "unavailable", "not the owner")
            raise HttpError("unavailable", f"app {app!r} is changing hands; retry in a moment") from None
        except StoreError as exc:
            _audit(route, call, app, "unavailable", str(exc))
            raise HttpError("unavailable", f"the database is unavailable: {exc}") from None
        _audit(route, call, app, "ok", None)
        if isinstance(result, web.StreamResponse):
            return result
        return await json_response(result, status=route.success)

    return handle


_NOBODY = Principal("anonymous", "viewer", frozenset())


async def _authenticate(request: web.Request, backend: AdminBackend) -> Principal:
    client = request.remote or "?"
    auth = backend.auth
    if auth.throttled(client):
        raise HttpError("rate_limited", "too many failed authentications from this address; wait a minute",
                        {"Retry-After": "60"})
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HttpError("unauthorized", "send Authorization: Bearer <token> (fastjob-server token create)",
                        {"WWW-Authenticate": "Bearer"})
    principal = await auth.verify(token.strip())
    if principal is None:
        auth.failed(client)
        raise HttpError("unauthorized", "unknown, revoked or expired token", {"WWW-Authenticate": "Bearer"})
    return principal


def _audit(route: Route, call: Call, app: str, outcome: str, detail: str | None) -> None:
    """Every mutating call, where it is applied (a forwarding server leaves it to the owner)."""
    if not route.action:
        return
    match = call.request.match_info
    target = match.get("name") or match.get("id") or call.target
    call.backend.audit.record(call.principal.name, route.action, app or None, target, outcome, detail)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except HttpError as exc:
        return await json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, body too large
        if exc.status < 400:
            raise
        code = _CODES.get(exc.status, "invalid")
        message = {404: f"no route {request.method} {request.path}", 405: f"{request.method} is not allowed here",
                   413: f"the body is larger than {MAX_BODY} bytes"}.get(exc.status, exc.reason)
        return await json_response(HttpError(code, message).body(), status=exc.status)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:  # a bug fails this request only; its detail stays in the log
        log.exception("%s %s failed", request.method, request.path)
        return await json_response(HttpError("internal", "internal error; the server's log says more").body(),
                                   status=500)
