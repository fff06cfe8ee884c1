"""Tokens and roles: who may do what, over HTTP and over the wire.

A token is ``fj_<id>_<secret>``. The id is its public key in the ``api_tokens`` table; the secret
is stored only as SHA-256 over a random per-token salt and the secret, and compared in constant
time. The secrets are 256 random bits, so a fast hash is enough: nobody guesses one offline.
Tokens given by ``--app-token APP=TOKEN`` keep whatever form the operator chose: they get a random
id and are found by their app's name (nothing derived from the secret is ever shown).

Roles: ``viewer`` reads, ``operator`` also triggers, pauses, kills and retries, ``admin`` also
manages jobs, tokens and servers; ``worker`` declares its app's jobs, triggers and reports.
Each token acts on every app, or on the apps it lists.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..commands import COMMAND_HANDLER, CONTAINER_HANDLER
from ..store import Store, TokenRow

ROLES = ("viewer", "operator", "admin", "worker")
#: How long a verified token is trusted without reading its row again (a revocation made on
#: another server takes effect within this; on the revoking server at once).
VERIFY_CACHE_SECONDS = 5.0
#: Failed authentications one client address may make per RATE_WINDOW before it gets 429.
MAX_FAILURES = 20
RATE_WINDOW = 60.0
#: Client addresses the rate limiter remembers (the oldest are forgotten first).
MAX_TRACKED_CLIENTS = 10_000


class Permission(str, enum.Enum):
    READ = "read"  # any GET
    TRIGGER = "trigger"  # fire a job now
    OPERATE = "operate"  # pause, resume, kill, retry
    DECLARE = "declare"  # a worker's declarations of its code's jobs
    MANAGE = "manage"  # create, change and delete jobs; tokens; drain servers


#: The permissions of each role.
GRANTS: dict[str, frozenset[Permission]] = {
    "viewer": frozenset({Permission.READ}),
    "operator": frozenset({Permission.READ, Permission.TRIGGER, Permission.OPERATE}),
    "admin": frozenset(Permission),
    "worker": frozenset({Permission.READ, Permission.TRIGGER, Permission.DECLARE}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from."""

    name: str
    role: str
    apps: frozenset[str] | None  # None: every app
    token_id: str | None = None

    def may(self, permission: Permission, app: str | None = None) -> bool:
        """Has the role this permission, on ``app`` (None: on no app in particular, i.e. global)?"""
        if permission not in GRANTS[self.role]:
            return False
        if self.apps is None:
            return True
        return app is not None and app in self.apps

    def sees(self, app: str) -> bool:
        return self.apps is None or app in self.apps


#: Who acts on a server that asks for no token (the wire of an open app on a loopback server).
OPEN_ACCESS = Principal("anonymous", "admin", None)

#: Handlers that run programs on the workers' hosts (commands.py): only an admin defines jobs for them.
PRIVILEGED_HANDLERS = (COMMAND_HANDLER, CONTAINER_HANDLER)


def definition_refusal(principal: Principal, handler: str) -> str | None:
    """Why ``principal`` may not create or change a job with ``handler``; None if it may. Checked where
    an operator defines jobs (the API, JOB_UPSERT), not for a worker's code (JOB_DECLARE): there the
    worker's allow-list decides what runs. Stated on its own, not left to MANAGE, so that no grant
    made to another role ever lets it define what programs run."""
    if handler.startswith(PRIVILEGED_HANDLERS) and principal.role != "admin":
        return (f"only an admin may create or change command and container jobs (handler {handler!r}),"
                f" not a {principal.role} token")
    return None


def hash_secret(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def app_token_name(app: str) -> str:
    """The name of the token ``--app-token`` gives an app (its form is the operator's, so it is found by this)."""
    return f"app-token:{app}"


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a ``fj_<id>_<secret>`` token; None if it has another form."""
    if not token.startswith("fj_"):
        return None
    token_id, sep, secret = token[3:].partition("_")
    if not sep or not token_id or not secret:
        return None
    return token_id, secret


def usable(row: TokenRow, now: float) -> bool:
    """Neither revoked nor expired."""
    return row.revoked_at is None and (row.expires_at is None or row.expires_at > now)


def matches(row: TokenRow, secret: str) -> bool:
    return hmac.compare_digest(hash_secret(row.salt, secret), row.secret_hash)


def new_token_row(name: str, role: str, apps: Sequence[str] | None, expires_at: float | None,
                  secret: str | None = None) -> tuple[str, TokenRow]:
    """A fresh token: (the token to show once, the row to store)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    token_id = secrets.token_hex(8)
    secret = secret or secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    row = TokenRow(token_id, name, role, None if apps is None else sorted(set(apps)), salt,
                   hash_secret(salt, secret), time.time(), expires_at)
    return f"fj_{token_id}_{secret}", row


class TokenAuthority:
    """Checks tokens against the store (with a short cache), creates and revokes them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._verified: dict[str, tuple[float, TokenRow]] = {}  # token id -> (checked at, row)
        self._failures: dict[str, list[float]] = {}  # client address -> failure times in the window
        self._all: tuple[float, list[TokenRow]] | None = None  # (read at, every token), for app tokens

    async def create(self, name: str, role: str, apps: Sequence[str] | None = None,
                     expires_at: float | None = None) -> tuple[str, TokenRow]:
        token, row = new_token_row(name, role, apps, expires_at)
        await self.store.add_token(row)
        return token, row

    async def ensure_app_token(self, app: str, token: str) -> None:
        """``--app-token APP=TOKEN``: a worker token of that app; an earlier one given for the app is revoked."""
        name = app_token_name(app)
        current = [row for row in await self.store.list_tokens() if row.name == name and row.revoked_at is None]
        if any(matches(row, token) for row in current):
            return
        for row in current:
            await self.revoke(row.id)
        _, row = new_token_row(name, "worker", [app], None, secret=token)
        await self.store.add_token(row)
        self._all = None

    async def revoke(self, token_id: str) -> bool:
        self._verified.pop(token_id, None)
        self._all = None
        return await self.store.revoke_token(token_id, time.time())

    async def still_valid(self, token_id: str) -> bool:
        """Is this token neither revoked nor expired (as of at most VERIFY_CACHE_SECONDS ago)?"""
        row = await self._row(token_id)
        return row is not None and usable(row, time.time())

    async def verify(self, token: str, app: str | None = None) -> Principal | None:
        """The principal of a valid token (not revoked, not expired), or None. ``app`` lets a
        token given by --app-token (any form) be found."""
        parts = split_token(token)
        if parts is not None:
            row = await self._row(parts[0])
            if row is not None and not matches(row, parts[1]):
                row = None
        elif app is not None:  # an --app-token: compared with each of its app's (one, as a rule)
            name = app_token_name(app)
            row = next((r for r in await self._tokens() if r.name == name and matches(r, token)), None)
        else:
            return None
        if row is None or not usable(row, time.time()):
            return None
        return Principal(row.name, row.role, None if row.apps is None else frozenset(row.apps), row.id)

    async def _row(self, token_id: str) -> TokenRow | None:
        cached = self._verified.get(token_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < VERIFY_CACHE_SECONDS:
            return cached[1]
        row = await self.store.get_token(token_id)
        if row is not None:
            if len(self._verified) > 4096:
                self._verified.clear()
            self._verified[token_id] = (now, row)
        return row

    async def app_requires_token(self, app: str) -> bool:
        """Has the app a worker token of its own (then its workers must present one)?"""
        return any(row.role == "worker" and row.apps is not None and app in row.apps and row.revoked_at is None
                   for row in await self._tokens())

    async def _tokens(self) -> list[TokenRow]:
        now = time.monotonic()
        if self._all is None or now - self._all[0] >= VERIFY_CACHE_SECONDS:
            self._all = (now, await self.store.list_tokens())
        return self._all[1]

    async def any_usable(self) -> bool:
        """Is there a token that can use the API (not a worker's, not revoked, not expired)?"""
        now = time.time()
        return any(row.role != "worker" and usable(row, now) for row in await self.store.list_tokens())

    # ---- failed attempts, per client address ----------------------------------------------------
    def throttled(self, client: str) -> bool:
        """Has this address failed too often lately (answer 429 without looking at its token)?"""
        return client in self._failures and len(self._recent(client)) >= MAX_FAILURES

    def failed(self, client: str) -> None:
        if client not in self._failures and len(self._failures) >= MAX_TRACKED_CLIENTS:
            self._failures.pop(next(iter(self._failures)))
        times = self._recent(client)
        times.append(time.monotonic())
        self._failures[client] = times

    def _recent(self, client: str) -> list[float]:
        cutoff = time.monotonic() - RATE_WINDOW
        times = [t for t in self._failures.get(client, ()) if t > cutoff]
        if client in self._failures:
            self._failures[client] = times
        return times
