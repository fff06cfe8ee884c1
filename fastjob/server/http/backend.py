"""What the admin API needs of its server, and the per-request context its views get."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from ...models import InstanceRow, JobRow, JobSpec, Status
from ...store import Store
from ..audit import AuditLog
from ..auth import Permission, Principal, TokenAuthority
from ..config import ServerConfig
from .errors import HttpError

if TYPE_CHECKING:
    from ..session import WorkerSession

#: The largest page a list answers.
MAX_LIMIT = 1000
#: The longest app name (as the wire's HELLO allows).
MAX_APP = 128


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


@dataclass(frozen=True, slots=True)
class Owner:
    """Where an app's actions are applied: here, or at a peer's admin API."""

    here: bool
    http_address: str = ""
    server_id: str = ""


class AdminBackend(Protocol):
    """The server as its admin API sees it."""

    @property
    def store(self) -> Store: ...
    @property
    def config(self) -> ServerConfig: ...
    @property
    def auth(self) -> TokenAuthority: ...
    @property
    def audit(self) -> AuditLog: ...
    @property
    def server_id(self) -> str: ...
    def owned_apps(self) -> dict[str, int]: ...
    def ready(self) -> tuple[bool, str]: ...
    async def owner_of(self, app: str, claim: bool) -> Owner | None: ...
    def first_fire_ms(self, job: JobRow | JobSpec, now_ms: int) -> int | None: ...
    async def upsert_job(self, spec: JobSpec) -> JobRow: ...
    async def reload_job(self, job_id: int) -> None: ...
    async def trigger(self, app: str, job: JobRow, params: Any, force: bool = False) -> InstanceRow: ...
    def kill(self, row: InstanceRow, job: JobRow | None) -> Status: ...
    async def retry(self, row: InstanceRow, job: JobRow, force: bool, params: Any) -> InstanceRow: ...
    def overlap_refusal(self, job: JobRow) -> str | None: ...
    async def flush_statuses(self) -> None: ...
    def workers_of(self, app: str) -> list[WorkerSession]: ...
    async def metrics_text(self) -> bytes: ...


@dataclass(slots=True)
class Call:
    """One request, authenticated: what a view reads its input from."""

    request: web.Request
    backend: AdminBackend
    principal: Principal
    forwarded: bool  # a peer forwarded it to us as the app's owner
    target: str = ""  # what it acted on, for the audit log, when the URL does not name it
    instance: InstanceRow | None = None  # the instance the URL names, once read (placement reads it first)

    @property
    def app(self) -> str:
        return self.request.match_info.get("app", "")

    def check_app(self) -> None:
        if "app" in self.request.match_info and not 0 < len(self.app) <= MAX_APP:
            raise HttpError("invalid", f"an app name is 1 to {MAX_APP} characters")

    def require(self, permission: Permission, app: str | None) -> None:
        if not self.principal.may(permission, app):
            where = f" on app {app!r}" if app else " across apps"
            raise HttpError("forbidden", f"a {self.principal.role} token may not {permission.value}{where}")

    def query_int(self, name: str, default: int | None, low: int, high: int) -> int | None:
        raw = self.request.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise HttpError("invalid", f"query parameter {name!r} must be an integer, got {raw[:40]!r}") from None
        if not low <= value <= high:
            raise HttpError("invalid", f"query parameter {name!r} must be in {low}..{high}, got {value}")
        return value

    def query_time_ms(self, name: str) -> int | None:
        """An epoch-seconds (or ISO 8601) query parameter, as epoch milliseconds."""
        raw = self.request.query.get(name)
        if raw is None or raw == "":
            return None
        from ... import schedule

        try:
            seconds = float(raw)
        except ValueError:
            try:
                seconds = schedule.parse_at(raw)
            except ValueError:
                raise HttpError("invalid", f"query parameter {name!r} must be epoch seconds or ISO 8601,"
                                           f" got {raw[:40]!r}") from None
        if not math.isfinite(seconds) or abs(seconds) > 1e11:
            raise HttpError("invalid", f"query parameter {name!r} is out of range")
        return int(seconds * 1000)

    def query_flag(self, name: str) -> bool:
        return self.request.query.get(name, "").lower() in ("1", "true", "yes")

    def query_statuses(self) -> Sequence[Status] | None:
        raw = self.request.query.get("status")
        if not raw:
            return None
        statuses = []
        for value in raw.split(","):
            try:
                statuses.append(Status(value.strip()))
            except ValueError:
                raise HttpError("invalid", f"unknown status {value[:40]!r}; known: "
                                           f"{', '.join(s.value for s in Status)}") from None
        return statuses

    async def body(self) -> dict[str, Any]:
        """The JSON object of the request body ({} if there is none)."""
        if not self.request.can_read_body:
            return {}
        try:
            value = json.loads(await self.request.text(), parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise HttpError("invalid", f"the body is not JSON: {str(exc)[:200]}") from None
        if not isinstance(value, dict):
            raise HttpError("invalid", "the body must be a JSON object")
        return value
