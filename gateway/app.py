"""The request path, top to bottom: match route -> extract credential -> authenticate -> decide -> forward.

`Gateway` is the data plane's handler (gateway/http does the HTTP framing). `handle()` returns a
response to send or the upstream request to forward; `done()` records metrics, usage and the access log.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable

from gateway.accesslog import AccessLog, AccessRecord, rfc3339
from gateway.auth import Authenticator
from gateway.core.request_id import new_request_id, valid_request_id
from gateway.core.route_config import Route
from gateway.core.settings import Settings
from gateway.core.targets import normalize_target
from gateway.entry import CachedCredential, Verdict
from gateway.extract import PresentedAccessToken, Refusal, extract, shortcut
from gateway.grants import AccessTokenVerifier, Grant
from gateway.headers import HeaderPolicy, ScannedHeaders, identity_block, is_websocket_upgrade, scan_request_headers
from gateway.http.exchange import Consume, Exchange, Forward, Note, Outcome, Respond
from gateway.identity import IdentitySigner
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimiter
from gateway.ratelimit_state import Bucket, Limited
from gateway.request_head import upstream_request_head
from gateway.routes import RouteTable, upstream_path
from gateway.usage import UsageRecorder

REALM = b'realm="credgate"'
# The method as text for the metrics and the log, without a decode per request for the common ones.
_METHOD_TEXT = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS")}
# The identity block's key per auth method: one bytes object for every cache entry, not one per entry (48 B each).
_BLOCK_KEYS = {method: method.encode() for method in ("bearer", "basic", "headers", "oauth")}
JSON = (b"Content-Type", b"application/json")
NO_STORE = (b"Cache-Control", b"no-store")

OwnEndpoint = Callable[[Exchange], "Respond | Consume | Awaitable[Respond]"]


def json_body(error: str, description: str) -> bytes:
    return json.dumps({"error": error, "error_description": description}, separators=(",", ":")).encode()


def challenge(error: bytes | None = None, description: bytes | None = None, scope: bytes | None = None) -> bytes:
    value = b"Bearer " + REALM
    if error:
        value += b', error="' + error + b'"'
    if description:
        value += b', error_description="' + description + b'"'
    if scope:
        value += b', scope="' + scope + b'"'
    return value


BASIC_CHALLENGE = (b"WWW-Authenticate", b"Basic " + REALM + b', charset="UTF-8"')


class Gateway:
    def __init__(
        self,
        settings: Settings,
        policy: HeaderPolicy,
        auth: Authenticator,
        metrics: GatewayMetrics,
        usage: UsageRecorder,
        access_log: AccessLog,
        *,
        tokens: AccessTokenVerifier | None = None,
        own: dict[bytes, OwnEndpoint] | None = None,
        limiter: RateLimiter | None = None,
        signer: IdentitySigner | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.routes = RouteTable(settings.routes)
        self.auth = auth
        self.metrics = metrics
        self.usage = usage
        self.log = access_log
        self.warn_seconds = settings.gateway.expiry_warning_days * 86400
        self.upstream_hosts = {r.prefix: f"{r.upstream.host}:{r.upstream.port}".encode() for r in settings.routes}
        names = settings.gateway.identity_headers
        self.identity_names = (
            names.user_id,
            names.user,
            names.groups,
            names.credential_id,
            names.credential_name,
            names.method,
        )
        self.scope_header = names.scope
        self.own: dict[bytes, OwnEndpoint] = own if own is not None else {}  # the gateway's own endpoints
        self.tokens = tokens  # OAuth2 access tokens are accepted when set (gateway.oauth issues them)
        self.limiter = limiter  # rate limits and quotas; None: nothing is limited
        self.signer = signer  # signs Credgate-Identity where routes (or identity.assertion) ask for it
        self.assert_identity = settings.identity.assertion
        # Tests tell workers apart by this header; off unless CREDGATE_DEBUG_WORKER_HEADER is set.
        self.worker_id = str(os.getpid()).encode() if os.environ.get("CREDGATE_DEBUG_WORKER_HEADER") else b""

    # --- the request path ---------------------------------------------------------------------------

    def handle(self, ex: Exchange) -> Respond | Forward | Consume | Awaitable[Respond | Forward]:
        return self.route_request(ex, ex.target, ex.method)

    def route_request(
        self, ex: Exchange, target: bytes, http_method: bytes
    ) -> Respond | Forward | Consume | Awaitable[Respond | Forward]:
        """Decide on a request for `target` with `http_method`: the exchange's own, or (forward-auth) the
        one a proxy asks about."""
        parsed = normalize_target(target)
        if parsed is None:
            note = ex.note = Note(b"-", new_request_id())
            return self.refuse(note, "bad_request", 400, "invalid_request", "malformed or ambiguous request path")
        path, query = parsed
        scanned = scan_request_headers(self.policy, ex.headers)
        rid = scanned.request_id
        note = ex.note = Note(path, rid if rid is not None and valid_request_id(rid) else new_request_id(), query)
        own = self.own.get(path)
        if own is not None:
            note.route = "_credgate"
            return own(ex)
        route = self.routes.match(path)
        if route is None:
            return self.refuse(note, "none", 404, "not_found", "no route for this path")
        note.route = route.name
        if scanned.upgrade is not None and not is_websocket_upgrade(scanned, http_method):
            # h2c and other protocol switches are never tunnelled (request smuggling via h2c)
            return self.refuse(note, "bad_request", 400, "invalid_request", "protocol upgrade not supported")
        if not route.auth_required:
            if route.rate_limit is not None and self.limiter is not None:
                buckets = self.limiter.for_address(route, ex.client_ip)
                if buckets is not None:
                    return self.limited(ex, route, scanned, note, b"", None, buckets)
            return self.admit(ex, route, scanned, note, b"")
        quick = shortcut(scanned.authorization, scanned.access_key, scanned.secret_key)
        if quick is not None:
            kind, public, secret, quick_method = quick
            remembered = self.auth.remembered(kind, public, secret)
            if remembered is not None:
                note.method = quick_method
                return self.decide(ex, route, scanned, note, remembered, quick_method)
        found = extract(scanned.authorization, scanned.access_key, scanned.secret_key, self.tokens is not None)
        if isinstance(found, Refusal):
            return self.refuse_credential(note, found)
        presented, method = found
        note.method = method
        if isinstance(presented, PresentedAccessToken):
            assert self.tokens is not None
            verdict: Verdict | Awaitable[Verdict] = self.tokens.verify(presented.value)
        else:
            verdict = self.auth.check(presented, ex.client_ip)
        if isinstance(verdict, Verdict):
            return self.decide(ex, route, scanned, note, verdict, method)
        return self._decide_later(ex, route, scanned, note, verdict, method)

    async def _decide_later(
        self, ex: Exchange, route: Route, scanned: ScannedHeaders, note: Note, pending: Awaitable[Verdict], method: str
    ) -> Respond | Forward:
        decided = self.decide(ex, route, scanned, note, await pending, method)
        return decided if isinstance(decided, Respond | Forward) else await decided

    def decide(
        self, ex: Exchange, route: Route, scanned: ScannedHeaders, note: Note, verdict: Verdict, method: str
    ) -> Respond | Forward | Awaitable[Respond | Forward]:
        entry = verdict.entry
        if entry is not None:
            note.credential, note.credential_id = entry.public_id, entry.credential_id
            note.owner, note.creator = entry.owner_name, entry.creator
        outcome = verdict.outcome
        if outcome == "ok":
            assert entry is not None
            # an access token grants its scope: the owner's groups narrowed to those the client asked for
            scope = verdict.scope if isinstance(verdict, Grant) else None
            if route.groups and route.groups.isdisjoint(entry.groups if scope is None else scope):
                return self.refuse(
                    note,
                    "forbidden",
                    403,
                    "insufficient_scope",
                    "the caller is not in a group this route requires",
                    challenge(b"insufficient_scope", None, " ".join(sorted(route.groups)).encode()),
                )
            identity = self.identity(entry, method, scope)
            if self.signer is not None and (
                self.assert_identity if route.identity_assertion is None else route.identity_assertion
            ):
                identity += self.signer.header_line(entry, route.name, method, entry.groups if scope is None else scope)
            if self.limiter is not None:
                buckets = self.limiter.for_credential(route, entry, ex.client_ip)
                if buckets is not None:
                    return self.limited(ex, route, scanned, note, identity, entry, buckets)
            return self.admit(ex, route, scanned, note, identity, entry)
        if outcome == "invalid":
            return self.invalid(note, method, "the credential is invalid")
        if outcome == "token_expired":
            return self.invalid(note, method, "the access token has expired", "expired")
        if outcome == "expired":
            return self.invalid(note, method, "the credential has expired", outcome)
        if outcome == "suspended":
            return self.invalid(note, method, "the credential's owner is suspended", outcome)
        if outcome == "throttled":
            return self.refuse(
                note,
                outcome,
                429,
                "too_many_requests",
                "too many failed attempts; retry later",
                retry_after=verdict.retry_after,
            )
        return self.refuse(
            note,
            "unavailable",
            503,
            "temporarily_unavailable",
            "credential store unavailable; retry later",
            retry_after=verdict.retry_after,
        )

    def limited(
        self,
        ex: Exchange,
        route: Route,
        scanned: ScannedHeaders,
        note: Note,
        identity: bytes,
        entry: CachedCredential | None,
        buckets: tuple[Bucket, ...],
    ) -> Respond | Forward | Awaitable[Respond | Forward]:
        """Forward within the limits, with the RateLimit fields on the response; 429 over them."""
        assert self.limiter is not None
        decision = self.limiter.check(route.name, buckets)
        if isinstance(decision, bytes):
            return self.admit(ex, route, scanned, note, identity, entry, decision)
        if isinstance(decision, Limited):
            return self.rate_limited(note, decision)
        return self._limited_later(ex, route, scanned, note, identity, entry, decision)

    async def _limited_later(
        self,
        ex: Exchange,
        route: Route,
        scanned: ScannedHeaders,
        note: Note,
        identity: bytes,
        entry: CachedCredential | None,
        pending: Awaitable[bytes | Limited],
    ) -> Respond | Forward:
        decision = await pending
        if isinstance(decision, Limited):
            return self.rate_limited(note, decision)
        return self.admit(ex, route, scanned, note, identity, entry, decision)

    def rate_limited(self, note: Note, limited: Limited) -> Respond:
        outcome = "quota_exceeded" if limited.error == "quota_exceeded" else "rate_limited"
        respond = self.refuse(note, outcome, 429, limited.error, limited.description, retry_after=limited.retry_after)
        respond.headers += [(b"RateLimit-Policy", limited.policy), (b"RateLimit", limited.state)]
        if limited.reset is not None:
            body = {"error": limited.error, "error_description": limited.description, "reset": rfc3339(limited.reset)}
            respond.body = json.dumps(body, separators=(",", ":")).encode()
        return respond

    def admit(
        self,
        ex: Exchange,
        route: Route,
        scanned: ScannedHeaders,
        note: Note,
        identity: bytes,
        entry: CachedCredential | None = None,
        limit_fields: bytes = b"",
    ) -> Respond | Forward:
        """The request may pass: here it is forwarded upstream (gateway.forward_auth answers 200 instead)."""
        note.outcome = "ok" if identity else "none"
        websocket = scanned.upgrade is not None
        host = None if route.preserve_host and scanned.host else self.upstream_hosts[route.prefix]
        head = upstream_request_head(
            self.policy,
            scanned,
            method=ex.method,
            path=upstream_path(route, note.path, note.query),
            client_ip=ex.client_ip,
            proto=b"http",
            identity_block=identity,
            request_id=note.request_id,
            host_override=host,
            websocket=websocket,
        )
        extra = b"X-Request-Id: " + note.request_id + b"\r\n" + limit_fields
        if self.worker_id:
            extra += b"X-Credgate-Worker: " + self.worker_id + b"\r\n"
        if entry is not None and entry.expires_at is not None and entry.expires_at - time.time() < self.warn_seconds:
            extra += b"Credgate-Credential-Expires: " + rfc3339(entry.expires_at).encode() + b"\r\n"
        # positional: keyword arguments cost about half of building the decision again
        upstream = route.upstream
        return Forward(upstream.host, upstream.port, head, extra, route.connect_timeout, route.read_timeout, websocket)

    def identity(self, entry: CachedCredential, method: str, scope: frozenset[str] | None = None) -> bytes:
        """The identity header lines for this credential and auth method (and access-token scope), built once
        per cache entry and scope."""
        scope_text = None if scope is None else " ".join(sorted(scope))
        key = (_BLOCK_KEYS.get(method) or method.encode()) if scope_text is None else b"oauth " + scope_text.encode()
        block = entry.block(key)
        if block is None:
            groups = entry.groups if scope is None else scope
            values = (str(entry.owner_id), entry.owner_name, groups, entry.public_id, entry.name or None, method)
            headers: dict[str, str | frozenset[str] | None] = dict(zip(self.identity_names, values, strict=True))
            headers[self.scope_header] = scope_text
            block = identity_block(self.policy, headers)
            entry.keep_block(key, block)
        return block

    # --- refusals -----------------------------------------------------------------------------------

    def refuse_credential(self, note: Note, refusal: Refusal) -> Respond:
        if refusal.reason == "conflict":
            return self.refuse(
                note, "bad_request", 400, "invalid_request", refusal.description, challenge(b"invalid_request")
            )
        if refusal.reason == "missing":
            return self.refuse(note, "missing", 401, "unauthorized", "a credential is required", challenge())
        note.method = refusal.method or ""
        return self.invalid(note, refusal.method or "", "the credential is invalid")

    def invalid(self, note: Note, method: str, description: str, outcome: str = "invalid") -> Respond:
        respond = self.refuse(
            note, outcome, 401, "invalid_token", description, challenge(b"invalid_token", description.encode())
        )
        if method == "basic":
            respond.headers.append(BASIC_CHALLENGE)
        return respond

    def refuse(
        self,
        note: Note,
        outcome: str,
        status: int,
        error: str,
        description: str,
        www_authenticate: bytes | None = None,
        retry_after: int = 0,
    ) -> Respond:
        note.outcome = outcome
        note.reason = error
        headers = [JSON, NO_STORE, (b"X-Request-Id", note.request_id)]
        if www_authenticate is not None:
            headers.append((b"WWW-Authenticate", www_authenticate))
        if retry_after:
            headers.append((b"Retry-After", str(retry_after).encode()))
        if self.worker_id:
            headers.append((b"X-Credgate-Worker", self.worker_id))
        return Respond(status, headers, json_body(error, description))

    def rejected(self, client_ip: str, status: int, error: str) -> None:
        """The data plane refused a request before handle() (bad framing, limits, slow head): log and count it."""
        self.metrics.count_request("-", "OTHER", status, "bad_request")
        if self.log.enabled:
            record = AccessRecord(
                request_id=b"-",
                client=client_ip,
                method="-",
                route="-",
                path=b"-",
                status=status,
                bytes_sent=0,
                seconds=0.0,
                upstream_seconds=None,
                auth_method="",
                auth_outcome="bad_request",
                credential="",
                owner="",
                creator="",
                reason=error,
            )
            self.log.request(record)

    def error_response(self, status: int, error: str, description: str) -> Respond:
        """Errors the data plane produces itself (400/408/413/414/431/502/504)."""
        return Respond(status, [JSON, NO_STORE], json_body(error, description))

    # --- after the response -------------------------------------------------------------------------

    def done(self, ex: Exchange, outcome: Outcome) -> None:
        note = ex.note
        if note is None:
            note = Note(b"-", b"-")
        total = time.perf_counter() - ex.started
        method = _METHOD_TEXT.get(ex.method) or ex.method.decode("latin-1")
        status = outcome.status
        upstream_seconds = outcome.upstream_seconds
        metrics = self.metrics
        metrics.count_request(note.route, method, status, note.outcome)
        metrics.observe_latency(note.route, total, upstream_seconds)
        if outcome.error is not None:
            metrics.upstream_error(outcome.error)  # bound children; ignores client-side errors
        if note.credential_id and note.outcome == "ok":
            self.usage.record(note.credential_id)
        log = self.log
        if log.enabled:
            log.line(note.request_id, ex.client_ip, method, note.route, note.path, status, outcome.bytes_sent, total,
                     upstream_seconds, note.method, note.outcome, note.credential, note.owner, note.creator,
                     note.reason or outcome.error or "")
