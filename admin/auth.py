"""Who is calling the admin API: session cookies (with CSRF), credgate credentials for scripts, login throttle, roles.

A session is a random cookie value; the database keeps only an HMAC of it, and the CSRF token is another
HMAC of it, so neither a copy of the sessions table nor a CSRF token lets anyone act as the user.
Unknown users, wrong passwords, service accounts and disabled users all get the same 401 after the same
argon2 work; so do unknown credentials, wrong secrets and revoked credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from admin.errors import ApiError, forbidden, unauthorized
from gateway.core import admin_sql, hashing, store
from gateway.core.formats import Presented
from gateway.core.settings import Settings
from gateway.core.store import Actor, Pool
from gateway.extract import extract

logger = logging.getLogger(__name__)

SESSION_COOKIE = "credgate_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# One address may fail more often than one username: several people can share an office NAT.
ADDRESS_FAILURE_FACTOR = 4
# Verified (credential, stored hash) digests remembered so a script's calls do not each cost an argon2 run;
# the stored hash is re-read on every request, so a rotation or revocation still takes effect at once.
VERIFIED_CACHE_SIZE = 4096
_SESSION_DOMAIN = b"credgate/admin-session/v1\x00"
_CSRF_DOMAIN = b"credgate/admin-csrf/v1\x00"
BAD_CREDENTIAL = "invalid credential"
BAD_LOGIN = "invalid username or password"


@dataclass(frozen=True, slots=True)
class Identity:
    """The authenticated caller: a principal and how it proved who it is."""

    principal_id: int
    name: str
    kind: str
    is_admin: bool
    method: str  # session | bearer | basic | headers
    session_hash: bytes | None = None
    session_expires_at: datetime | None = None
    csrf_token: str | None = None
    credential_id: str | None = None

    def __repr__(self) -> str:
        return f"Identity(name={self.name!r}, method={self.method!r}, is_admin={self.is_admin})"


IDENTITY = web.RequestKey("credgate_identity", Identity)
REQUEST_ID = web.RequestKey("credgate_request_id", str)


def current(request: web.Request) -> Identity:
    """The caller; the auth middleware has refused the request already when there is none."""
    return request[IDENTITY]


def require_admin(identity: Identity) -> None:
    if not identity.is_admin:
        raise forbidden()


def source_address(request: web.Request) -> str:
    return request.remote or ""


def actor_for(request: web.Request) -> Actor:
    """The audit actor of a request: principal, auth method, request id and source address."""
    identity = current(request)
    return Actor(label=identity.name, principal_id=identity.principal_id, auth_method=identity.method,
                 request_id=request.get(REQUEST_ID, ""), source=source_address(request))


class LoginThrottle:
    """Failed logins per username and per source address in a sliding window, counted in the database."""

    def __init__(self, pool: Pool, max_failures: int, window_seconds: float) -> None:
        self.pool = pool
        self.max_failures = max_failures
        self.window = window_seconds

    async def retry_after(self, username: str, address: str) -> int:
        """Seconds until a login attempt is allowed again; 0 when it is allowed now."""
        wait = 0.0
        async with self.pool.acquire() as conn:
            for scope, key, limit in (("user", username, self.max_failures),
                                      ("address", address, self.max_failures * ADDRESS_FAILURE_FACTOR)):
                rows = await conn.fetch(admin_sql.RECENT_LOGIN_FAILURES, scope, key, self.window, limit)
                if len(rows) >= limit:
                    # allowed again once the limit-th most recent failure leaves the window
                    edge = rows[limit - 1]
                    wait = max(wait, self.window - (edge["now"] - edge["failed_at"]).total_seconds(), 1.0)
        return math.ceil(wait)

    async def failed(self, username: str, address: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(admin_sql.INSERT_LOGIN_FAILURES, username, address)


class AdminAuth:
    """Authenticates requests (session or credential), logs users in and out."""

    def __init__(self, settings: Settings, pool: Pool, argon2: hashing.Argon2Pool) -> None:
        self.key = settings.secret_key_bytes
        self.pool = pool
        self.argon2 = argon2
        self.session_ttl = settings.admin.session_ttl
        self.access_key_header = settings.gateway.access_key_header
        self.secret_key_header = settings.gateway.secret_key_header
        self.throttle = LoginThrottle(pool, settings.admin.login_max_failures, settings.admin.login_window_seconds)
        self._dummy_hash = ""
        self._verified: dict[tuple[str, str], bytes] = {}

    async def start(self) -> None:
        # Verified against when there is no real hash, so a miss costs the same argon2 work as a wrong secret.
        self._dummy_hash = await self.argon2.hash(secrets.token_urlsafe(24))

    def session_hash(self, token: str) -> bytes:
        return hmac.digest(self.key, _SESSION_DOMAIN + token.encode("utf-8", "surrogateescape"), hashlib.sha256)

    def csrf_token(self, token: str) -> str:
        mac = hmac.digest(self.key, _CSRF_DOMAIN + token.encode("utf-8", "surrogateescape"), hashlib.sha256)
        return mac.hex()

    # --- per request -------------------------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> Identity | None:
        """The caller, None when the request carries no credential or session; ApiError when one is wrong."""
        found = extract(_raw(request, "Authorization"), _raw(request, self.access_key_header),
                        _raw(request, self.secret_key_header))
        if isinstance(found, tuple):
            presented, method = found
            return await self._from_credential(presented, method)
        if found.reason == "conflict":
            raise ApiError(400, "invalid_request", found.description)
        if found.reason == "malformed":
            raise unauthorized(BAD_CREDENTIAL)
        token = request.cookies.get(SESSION_COOKIE)
        if token is None:
            return None
        return await self._from_session(token)

    def check_csrf(self, request: web.Request, identity: Identity) -> None:
        """A state-changing request authenticated by the cookie must echo the session's CSRF token."""
        if identity.method != "session" or request.method in SAFE_METHODS:
            return
        sent = request.headers.get(CSRF_HEADER, "").encode("utf-8", "surrogateescape")
        expected = (identity.csrf_token or "").encode()
        if not expected or not hmac.compare_digest(sent, expected):
            raise ApiError(403, "csrf_failed", f"missing or wrong {CSRF_HEADER} header; send the csrf_token "
                           "returned by POST /api/v1/session")

    async def session_identity(self, token: str) -> Identity:
        """Who a session cookie belongs to (the web UI's or the API's); ApiError 401 when it is not valid."""
        return await self._from_session(token)

    async def _from_session(self, token: str) -> Identity:
        if not 0 < len(token) <= 128:
            raise unauthorized("session expired or logged out; log in again")
        session_hash = self.session_hash(token)
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(admin_sql.ADMIN_SESSION_PRINCIPAL, session_hash)
        if row is None:
            raise unauthorized("session expired or logged out; log in again")
        return Identity(row["id"], row["name"], row["kind"], row["is_admin"], "session", session_hash,
                        row["expires_at"], self.csrf_token(token))

    async def _from_credential(self, presented: Presented, method: str) -> Identity:
        async with self.pool.acquire() as conn:
            record = await store.fetch_auth_record(conn, presented.public_id)
            owner = None if record is None else await conn.fetchrow(admin_sql.PRINCIPAL_BY_ID, record.owner_id)
        if record is None or owner is None or record.kind != presented.kind:
            await self.argon2.verify(self._dummy_hash, presented.secret)
            raise unauthorized(BAD_CREDENTIAL)
        if not await self._secret_matches(record, presented):
            raise unauthorized(BAD_CREDENTIAL)
        now = datetime.now(UTC)
        if record.revoked_at is not None:
            raise unauthorized(BAD_CREDENTIAL)
        if record.expires_at is not None and record.expires_at <= now:
            raise unauthorized("credential expired")
        if record.owner_disabled or owner["disabled"] or owner["deleted_at"] is not None:
            raise unauthorized("credential suspended: its owner is disabled")
        return Identity(owner["id"], owner["name"], owner["kind"], owner["is_admin"], method,
                        credential_id=record.public_id)

    async def _secret_matches(self, record: store.AuthRecord, presented: Presented) -> bool:
        hashes = [record.secret_hash]
        if record.previous_secret_hash and record.previous_expires_at and \
                record.previous_expires_at > datetime.now(UTC):
            hashes.append(record.previous_secret_hash)
        digest = hashing.secret_digest(self.key, presented.kind, presented.public_id, presented.secret)
        for stored in hashes:
            known = self._verified.get((record.public_id, stored))
            if known is not None and hashing.digests_equal(known, digest):
                return True
        for stored in hashes:
            if await self.argon2.verify(stored, presented.secret):
                if len(self._verified) >= VERIFIED_CACHE_SIZE:
                    self._verified.clear()
                self._verified[(record.public_id, stored)] = digest
                return True
        return False

    # --- login and logout --------------------------------------------------------------------------------

    async def login(self, username: str, password: str, request_id: str, source: str) -> tuple[Identity, str]:
        """A new session for an interactive user; returns the identity and the cookie value."""
        retry = await self.throttle.retry_after(username, source)
        if retry:
            raise ApiError(429, "throttled", f"too many failed logins; try again in {retry} s",
                           headers={"Retry-After": str(retry)})
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(admin_sql.PRINCIPAL_BY_NAME, username)
        usable = row is not None and row["kind"] == "user" and not row["disabled"] and bool(row["password_hash"])
        stored = row["password_hash"] if row is not None and usable else self._dummy_hash
        matched = await self.argon2.verify(stored, password)
        if not (matched and usable) or row is None:
            await self.throttle.failed(username, source)
            logger.info("admin login failed from %s", source)
            raise unauthorized(BAD_LOGIN)
        if hashing.needs_rehash(self.argon2.hasher, stored):
            await self._rehash(row["id"], stored, password)
        token = secrets.token_urlsafe(32)
        session_hash = self.session_hash(token)
        actor = Actor(label=row["name"], principal_id=row["id"], auth_method="password", request_id=request_id,
                      source=source)
        async with self.pool.acquire() as conn, conn.transaction():
            expires_at = await conn.fetchval(admin_sql.INSERT_ADMIN_SESSION, session_hash, row["id"],
                                             self.session_ttl, source)
            await conn.execute(admin_sql.CLEAR_USER_LOGIN_FAILURES, username)
            await store.write_audit(conn, actor, "session.login", "principal", row["name"], {})
        identity = Identity(row["id"], row["name"], row["kind"], row["is_admin"], "session", session_hash,
                            expires_at, self.csrf_token(token))
        return identity, token

    async def _rehash(self, principal_id: int, old_hash: str, password: str) -> None:
        new_hash = await self.argon2.hash(password)
        async with self.pool.acquire() as conn:
            await conn.execute(admin_sql.REHASH_PASSWORD, principal_id, new_hash, old_hash)

    async def logout(self, identity: Identity, actor: Actor) -> None:
        if identity.session_hash is None:
            raise ApiError(400, "invalid_request", "this request is not authenticated by a session; "
                           "there is nothing to log out")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(admin_sql.DELETE_ADMIN_SESSION, identity.session_hash)
            await store.write_audit(conn, actor, "session.logout", "principal", identity.name, {})

    async def end_sessions(self, principal_id: int, keep: bytes | None = None) -> None:
        """Log a principal out everywhere (except the session `keep`), e.g. after a password change."""
        async with self.pool.acquire() as conn:
            await conn.execute(admin_sql.DELETE_PRINCIPAL_SESSIONS, principal_id, keep)

    async def verify_password(self, principal_id: int, password: str) -> bool:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(admin_sql.PRINCIPAL_BY_ID, principal_id)
        stored = row["password_hash"] if row is not None and row["password_hash"] else self._dummy_hash
        matched = await self.argon2.verify(stored, password)
        return matched and stored is not self._dummy_hash


def _raw(request: web.Request, name: str) -> tuple[bytes, ...]:
    return tuple(v.encode("utf-8", "surrogateescape") for v in request.headers.getall(name, ()))


def cookie_settings(request: web.Request, max_age: float) -> dict[str, Any]:
    """HttpOnly, SameSite=Strict, Secure whenever the request itself came over TLS."""
    return {"httponly": True, "samesite": "Strict", "secure": request.secure, "path": "/api/",
            "max_age": int(max_age)}
