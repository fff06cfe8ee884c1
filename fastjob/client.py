"""A typed async client of fastjob-server's HTTP admin API (the routes of
fastjob/server/http/routes.py), on aiohttp.

Every method answers the API's JSON as plain dicts, so that what a script reads is what the API
documents (its OpenAPI document at /api/v1/openapi.json); only :meth:`Client.trigger` answers an
int, the new instance's id. An error answer raises :class:`ApiError` with the API's code; a
server that cannot be reached raises ``ApiError(0, "unreachable", ...)``, so callers handle one
exception type::

    async with Client("http://127.0.0.1:7701", token) as client:
        instance_id = await client.trigger("billing", "invoice")
        async for line in client.follow_logs(instance_id):
            print(line["message"])
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

__all__ = ["DEFAULT_URL", "ApiError", "Client", "LogStream"]

DEFAULT_URL = "http://127.0.0.1:7701"
#: How long a live log tail may be silent: the server writes a keep-alive every 15 s.
TAIL_SILENCE = 60.0
#: A log tail that closes without its end event after this long is reopened (the server caps a
#: tail's length); one that closes sooner means the server went away.
TAIL_REOPEN_AFTER = 60.0

Json = dict[str, Any]
Query = Mapping[str, Any]


class ApiError(Exception):
    """An error answer of the API (``status`` its HTTP status, ``code`` its error code), or
    ``status`` 0 when no answer came: callers tell "the server refused" from "no server"."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _segment(value: str | int) -> str:
    """One path segment, escaped: a job name may hold any character, '/' included."""
    return quote(str(value), safe="")


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, dt.datetime):
        return repr(value.timestamp())
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def _query(values: Query) -> dict[str, str]:
    """The query string's parameters: None means "not given"."""
    return {key: _query_value(value) for key, value in values.items() if value is not None}


def _given(**values: Any) -> Json:
    """A body of only the values given (None: left to the server's default)."""
    return {key: value for key, value in values.items() if value is not None}


class Client:
    """The admin API of one server (any server of a cluster: it forwards actions to the app's owner).

    ``url`` and ``token`` default to the environment's FASTJOB_URL (else http://127.0.0.1:7701)
    and FASTJOB_TOKEN; ``timeout`` bounds each request, in seconds. Use it as an async context
    manager, or call :meth:`close` when done.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0) -> None:
        url = url or os.environ.get("FASTJOB_URL") or DEFAULT_URL
        self.url = (url if "://" in url else f"http://{url}").rstrip("/")
        self.token = token if token is not None else os.environ.get("FASTJOB_TOKEN") or None
        self.timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ---- transport -----------------------------------------------------------------------------
    def _session(self) -> aiohttp.ClientSession:
        """Made at first use, on the running loop (a Client may be built outside one)."""
        if self._http is None or self._http.closed:
            headers = {"Accept": "application/json"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            self._http = aiohttp.ClientSession(headers=headers)
        return self._http

    def _url(self, path: str) -> URL:
        return URL(self.url + path, encoded=True)

    async def _call(self, method: str, path: str, query: Query | None = None, body: Json | None = None,
                    headers: dict[str, str] | None = None) -> Json:
        """One request; its JSON answer, or ApiError."""
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self._session().request(method, self._url(path), params=_query(query or {}), json=body,
                                               headers=headers, timeout=timeout) as answer:
                return await _answer(answer)
        except asyncio.TimeoutError:
            raise ApiError(0, "unreachable", f"{self.url}: no answer within {self.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise ApiError(0, "unreachable", f"{self.url}: {_why(exc)}") from None

    async def _events(self, path: str, query: Query) -> AsyncGenerator[tuple[str, str], None]:
        """The (event, data) pairs of a server-sent event stream, until it closes."""
        silence = max(self.timeout, TAIL_SILENCE)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=silence)
        try:
            async with self._session().get(self._url(path), params=_query(query), timeout=timeout,
                                           headers={"Accept": "text/event-stream"}) as answer:
                if answer.status >= 400 or answer.content_type != "text/event-stream":
                    await _answer(answer)  # raises the error (or a wrong kind of answer)
                    raise ApiError(answer.status, "bad_answer", "expected server-sent events")
                async for event in _parse_events(answer.content):
                    yield event
        except asyncio.TimeoutError:
            raise ApiError(0, "unreachable", f"{self.url}: the log stream was silent too long") from None
        except aiohttp.ClientError as exc:
            raise ApiError(0, "unreachable", f"{self.url}: {_why(exc)}") from None

    # ---- health and cluster --------------------------------------------------------------------------
    async def healthz(self) -> Json:
        """The process is up (no token needed)."""
        return await self._call("GET", "/healthz")

    async def readyz(self) -> Json:
        """The store answers and the server's lease is valid; ApiError 503 otherwise."""
        return await self._call("GET", "/readyz")

    async def openapi(self) -> Json:
        return await self._call("GET", "/api/v1/openapi.json")

    async def cluster(self) -> Json:
        """Servers (heartbeat age, owned apps, load) and apps (owner, epoch, owner since)."""
        return await self._call("GET", "/api/v1/cluster")

    async def cluster_history(self, app: str | None = None, cursor: str | None = None,
                              limit: int | None = None) -> Json:
        """Ownership changes, newest first; pass back ``next_cursor`` for the next page."""
        return await self._call("GET", "/api/v1/cluster/history", {"app": app, "cursor": cursor, "limit": limit})

    async def workers(self, app: str) -> Json:
        """The app's connected workers, as its owner sees them."""
        return await self._call("GET", f"/api/v1/apps/{_segment(app)}/workers")

    async def drain(self, server_id: str, undo: bool = False) -> Json:
        """Ask a server to hand its apps to the others (``undo``: let it take apps again)."""
        return await self._call("POST", f"/api/v1/servers/{_segment(server_id)}/drain", body={"undo": undo})

    # ---- jobs ------------------------------------------------------------------------------------------------
    def _job_path(self, app: str, name: str | None = None, action: str = "") -> str:
        path = f"/api/v1/apps/{_segment(app)}/jobs"
        if name is not None:
            path += f"/{_segment(name)}"
        return path + (f"/{action}" if action else "")

    async def list_jobs(self, app: str, name: str | None = None, tag: str | None = None,
                        enabled: bool | None = None, cursor: str | None = None, limit: int | None = None) -> Json:
        """``{"jobs": [...], "next_cursor"}``, by name; ``name`` matches a part of it."""
        query = {"name": name, "tag": tag, "enabled": enabled, "cursor": cursor, "limit": limit}
        return await self._call("GET", self._job_path(app), query)

    async def get_job(self, app: str, name: str, next: int | None = None) -> Json:
        """``{"job": ...}``; with ``next``, also ``next_fires``: its next fire times (epoch seconds)."""
        return await self._call("GET", self._job_path(app, name), {"next": next})

    async def create_job(self, app: str, job: Mapping[str, Any] | None = None, /, **fields: Any) -> Json:
        """Create a job from ``Worker.schedule``'s keywords (a dict, keywords, or both); ``{"job": ...}``."""
        return await self._call("POST", self._job_path(app), body={**(job or {}), **fields})

    async def update_job(self, app: str, name: str, job: Mapping[str, Any] | None = None, /, **fields: Any) -> Json:
        """Change the fields given (one schedule keyword replaces the schedule); ``{"job": ...}``."""
        return await self._call("PATCH", self._job_path(app, name), body={**(job or {}), **fields})

    async def delete_job(self, app: str, name: str) -> Json:
        return await self._call("DELETE", self._job_path(app, name))

    async def pause_job(self, app: str, name: str) -> Json:
        return await self._call("POST", self._job_path(app, name, "pause"))

    async def resume_job(self, app: str, name: str) -> Json:
        return await self._call("POST", self._job_path(app, name, "resume"))

    async def trigger(self, app: str, name: str, params: Any = None, force: bool = False,
                      idempotency_key: str | None = None) -> int:
        """Fire the job now; the new instance's id. ``force`` fires even if its overlap policy
        refuses; with ``idempotency_key`` a repeated call answers the first call's instance."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        body = _given(params=params, force=force or None)
        answer = await self._call("POST", self._job_path(app, name, "trigger"), body=body, headers=headers)
        return int(answer["instance_id"])

    async def preview_job(self, app: str, job: Mapping[str, Any], next: int = 10) -> Json:
        """Check an unsaved job: ``{"valid", "job", "next_fires"}``, or ApiError "invalid"."""
        return await self._call("POST", self._job_path(app, None, "preview"), {"next": next}, dict(job))

    async def job_runs(self, app: str, name: str, limit: int | None = None) -> Json:
        """Run history of a worker-run (second-level) job, newest first."""
        return await self._call("GET", self._job_path(app, name, "runs"), {"limit": limit})

    # ---- instances ------------------------------------------------------------------------------------------
    async def list_instances(self, app: str, job: str | None = None, status: str | list[str] | None = None,
                             since: float | str | dt.datetime | None = None,
                             until: float | str | dt.datetime | None = None, cursor: str | None = None,
                             limit: int | None = None) -> Json:
        """``{"instances": [...], "next_cursor"}``, latest planned first (up to 1 s old)."""
        query = {"job": job, "status": status, "since": since, "until": until, "cursor": cursor, "limit": limit}
        return await self._call("GET", f"/api/v1/apps/{_segment(app)}/instances", query)

    async def get_instance(self, instance_id: int) -> Json:
        """``{"instance": ..., "attempts": [...]}``: it and every attempt of its fire."""
        return await self._call("GET", f"/api/v1/instances/{_segment(instance_id)}")

    async def logs(self, instance_id: int, limit: int | None = None) -> Json:
        """``{"lines": [{"ts", "level", "message"}, ...]}`` written so far."""
        return await self._call("GET", f"/api/v1/instances/{_segment(instance_id)}/logs", {"limit": limit})

    def follow_logs(self, instance_id: int) -> LogStream:
        """Its log lines as they are written (those already written first), until it ends."""
        return LogStream(self, instance_id)

    async def kill(self, instance_id: int) -> Json:
        """Stop it: ``{"instance_id", "status"}``, status ``killed`` (or ``cancelled`` if it had not
        started; ``killing`` if its worker has not confirmed yet)."""
        return await self._call("POST", f"/api/v1/instances/{_segment(instance_id)}/kill")

    async def retry(self, instance_id: int, force: bool = False, params: Any = None) -> Json:
        """Run a finished instance's fire again: ``{"instance_id", "attempt"}`` of the new attempt."""
        body = _given(force=force or None, params=params)
        return await self._call("POST", f"/api/v1/instances/{_segment(instance_id)}/retry", body=body)

    async def subtasks(self, instance_id: int, cursor: str | None = None, limit: int | None = None) -> Json:
        """``{"progress": {"items", "done", "failed"}, "batches": [...], "next_cursor"}``: the sub-task
        batches of its fire (maps, a broadcast's sub-runs, a workflow's steps)."""
        return await self._call("GET", f"/api/v1/instances/{_segment(instance_id)}/subtasks",
                                {"cursor": cursor, "limit": limit})

    async def steps(self, instance_id: int) -> Json:
        """``{"instance_id", "steps": [{"name", "after", "status", "result", "error", ...}]}`` of a workflow's fire."""
        return await self._call("GET", f"/api/v1/instances/{_segment(instance_id)}/steps")

    async def succeed_step(self, instance_id: int, step: str, result: Any = None) -> Json:
        """Mark a workflow step succeeded by hand (no attempt of the fire may run); retry the
        instance then to run what follows it."""
        return await self._call("POST", f"/api/v1/instances/{_segment(instance_id)}/steps/{_segment(step)}/succeed",
                                body={"result": result})

    async def stats(self, app: str, window: str | None = None) -> Json:
        """Fires by outcome over ``window`` (like 15m, 1h, 7d) and lateness percentiles."""
        return await self._call("GET", f"/api/v1/apps/{_segment(app)}/stats", {"window": window})

    # ---- tokens and audit -----------------------------------------------------------------------------
    async def list_tokens(self) -> Json:
        return await self._call("GET", "/api/v1/tokens")

    async def create_token(self, name: str, role: str, apps: list[str] | None = None,
                           expires_in: float | None = None) -> Json:
        """A new token: its secret is in this answer's ``token`` only."""
        body = _given(name=name, role=role, apps=apps, expires_in=expires_in)
        return await self._call("POST", "/api/v1/tokens", body=body)

    async def revoke_token(self, token_id: str) -> Json:
        return await self._call("DELETE", f"/api/v1/tokens/{_segment(token_id)}")

    async def audit(self, app: str | None = None, cursor: str | None = None, limit: int | None = None) -> Json:
        """Mutating calls, newest first (admins only)."""
        return await self._call("GET", "/api/v1/audit", {"app": app, "cursor": cursor, "limit": limit})


class LogStream:
    """The live tail of an instance's log, as an async iterator of ``{"ts", "level", "message"}``
    that ends when the instance ends; ``status`` then says how it ended.

    The server caps one tail's length: a tail it closes is reopened, and the lines already seen are
    skipped (the server sends a tail from the first line).
    """

    def __init__(self, client: Client, instance_id: int) -> None:
        self.instance_id = instance_id
        self.status: str | None = None
        self._lines = self._follow(client)

    def __aiter__(self) -> LogStream:
        return self

    async def __anext__(self) -> Json:
        return await self._lines.__anext__()

    async def aclose(self) -> None:
        """Stop following early (the connection is released)."""
        await self._lines.aclose()

    async def _follow(self, client: Client) -> AsyncGenerator[Json, None]:
        seen = 0
        path = f"/api/v1/instances/{_segment(self.instance_id)}/logs"
        while True:
            opened, count = time.monotonic(), 0
            async with contextlib.aclosing(client._events(path, {"follow": 1})) as events:
                async for event, data in events:
                    if event == "end":
                        self.status = str(json.loads(data).get("status"))
                        return
                    if event == "line":
                        count += 1
                        if count > seen:
                            seen = count
                            yield json.loads(data)
            if time.monotonic() - opened < TAIL_REOPEN_AFTER:
                raise ApiError(0, "unreachable", f"{client.url}: the log stream of instance {self.instance_id}"
                                                 " closed before the instance ended")


async def _parse_events(stream: aiohttp.StreamReader) -> AsyncGenerator[tuple[str, str], None]:
    """Server-sent events (the WHATWG format): comments skipped, multi-line data joined."""
    buffer = b""
    event = "message"
    data: list[str] = []
    async for chunk in stream.iter_any():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if not line:
                if data:
                    yield event, "\n".join(data)
                event, data = "message", []
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


async def _answer(answer: aiohttp.ClientResponse) -> Json:
    """A response's JSON object, or the ApiError it carries."""
    text = await answer.text(errors="replace")
    try:
        payload = json.loads(text) if text else {}
    except ValueError:
        payload = None
    if answer.status >= 400:
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            raise ApiError(answer.status, str(error.get("code")), str(error.get("message")))
        raise ApiError(answer.status, "http_error", f"HTTP {answer.status}: {text.strip()[:200] or answer.reason}")
    if not isinstance(payload, dict):
        raise ApiError(answer.status, "bad_answer", f"not a JSON object: {text.strip()[:200]!r}")
    return payload


def _why(exc: aiohttp.ClientError) -> str:
    """A one-line reason for a failed connection (aiohttp's own can span lines)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
