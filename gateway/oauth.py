"""The OAuth2 endpoints the gateway serves itself: token (RFC 6749 §4.4, client credentials), revocation
(RFC 7009), introspection (RFC 7662) and the authorization server metadata (RFC 8414).

Clients authenticate with a key pair, by HTTP Basic (RFC 6749 §2.3.1) or by client_id + client_secret form
fields, never both, through the same Authenticator (caches, argon2, failure throttle) as proxied requests.
Every answer carries Cache-Control: no-store and Pragma: no-cache; errors are RFC 6749 §5.2 JSON.
"""

from __future__ import annotations

import binascii
import hmac
import json
import re
import time
from base64 import b64decode
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, unquote_plus, urlsplit

from gateway.app import JSON, NO_STORE, REALM, OwnEndpoint, json_body
from gateway.auth import Authenticator
from gateway.core.errors import STORE_ERRORS
from gateway.core.formats import Presented, client_id_for, parse_key_pair, parse_key_secret, parse_token
from gateway.core.settings import Settings
from gateway.denylist import TokenDenylist
from gateway.entry import CachedCredential, Verdict
from gateway.grants import AccessTokenVerifier
from gateway.headers import HeaderPolicy, scan_request_headers
from gateway.http.exchange import Consume, Exchange, Note, Respond
from gateway.tokens import SigningKeys

__all__ = [
    "METADATA_PATH",
    "ClientAuth",
    "OAuthEndpoints",
    "OAuthError",
    "client_from_request",
    "parse_form",
    "parse_scope",
]

METADATA_PATH: Final = "/.well-known/oauth-authorization-server"
# Forms here hold a few short parameters; the largest is a scope listing many group names.
FORM_LIMIT: Final = 16 * 1024
_MAX_FIELDS: Final = 16
_FORM_TYPE: Final = b"application/x-www-form-urlencoded"
AUTH_METHODS: Final = ("client_secret_basic", "client_secret_post")
PRAGMA: Final = (b"Pragma", b"no-cache")
BASIC_CHALLENGE: Final = (b"WWW-Authenticate", b"Basic " + REALM + b', charset="UTF-8"')
# A Host (or X-Forwarded-Host) the issuer may be built from: a DNS name or IP literal and an optional port.
_HOST: Final = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
# RFC 6749 §3.3 scope-token characters, minus the space that separates them.
_SCOPE_TOKEN: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


class OAuthError(Exception):
    """An RFC 6749 §5.2 error answer; 401 ones carry the Basic challenge (the scheme clients may use)."""

    def __init__(self, status: int, error: str, description: str, retry_after: int = 0) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.description = description
        self.retry_after = retry_after


def invalid_request(description: str) -> OAuthError:
    return OAuthError(400, "invalid_request", description)


def invalid_client(description: str = "client authentication failed") -> OAuthError:
    # §5.2: 401 with a challenge, required when the client used the Authorization header and allowed otherwise
    return OAuthError(401, "invalid_client", description)


# --- pure parsing ---------------------------------------------------------------------------------------------


def parse_form(body: bytes) -> dict[str, str]:
    """The form parameters; a parameter sent empty counts as omitted (§3.1), a repeated one is an error."""
    try:
        pairs = parse_qsl(
            body.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=True,
            errors="strict",
            max_num_fields=_MAX_FIELDS,
        )
    except (UnicodeError, ValueError):
        raise invalid_request("the body is not a valid application/x-www-form-urlencoded form") from None
    form: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in pairs:
        if name in seen:
            raise invalid_request(f"parameter {_name_for_message(name)} is repeated")
        seen.add(name)
        if value:
            form[name] = value
    return form


def _name_for_message(name: str) -> str:
    """A parameter name safe to repeat in an error description (only names we define are echoed)."""
    known = {"grant_type", "scope", "client_id", "client_secret", "token", "token_type_hint"}
    return name if name in known else "(unknown)"


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """How the client authenticated: its key pair and whether it came by HTTP Basic."""

    presented: Presented
    basic: bool

    @property
    def method(self) -> str:
        return AUTH_METHODS[0] if self.basic else AUTH_METHODS[1]


def client_from_request(authorization: tuple[bytes, ...], form: dict[str, str]) -> ClientAuth:
    """The client's key pair from Basic or from the form (never both); format checked, no I/O."""
    if len(authorization) > 1:
        raise invalid_request("the Authorization header is repeated")
    if authorization:
        scheme, _, credentials = authorization[0].strip().partition(b" ")
        if scheme.lower() != b"basic":
            raise invalid_client("authenticate with HTTP Basic or client_secret_post")
        if "client_secret" in form:
            raise invalid_request("use one client authentication method: HTTP Basic or form fields, not both")
        client_id, secret = _basic_pair(credentials.strip(b" "))
        if "client_id" in form and form["client_id"] != client_id:
            raise invalid_request("client_id does not match the HTTP Basic user name")
        presented = parse_key_pair(client_id, secret)
        if presented is None:
            raise invalid_client()
        return ClientAuth(presented, basic=True)
    form_id, form_secret = form.get("client_id"), form.get("client_secret")
    if form_id is None or form_secret is None:
        raise invalid_client("client authentication required: HTTP Basic or client_id and client_secret")
    presented = parse_key_pair(form_id, form_secret)
    if presented is None:
        raise invalid_client()
    return ClientAuth(presented, basic=False)


def _basic_pair(credentials: bytes) -> tuple[str, str]:
    """RFC 6749 §2.3.1: base64(urlencoded id ":" urlencoded secret); each half form-urldecoded."""
    if not credentials or len(credentials) > 1024:
        raise invalid_client()
    try:
        client_id, sep, secret = b64decode(credentials, validate=True).decode("utf-8").partition(":")
        if not sep:
            raise invalid_client()
        return unquote_plus(client_id, errors="strict"), unquote_plus(secret, errors="strict")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        raise invalid_client() from None


def parse_scope(value: str | None) -> frozenset[str] | None:
    """The requested scope tokens (RFC 6749 §3.3, space-delimited); None when no scope was requested."""
    if value is None:
        return None
    tokens = [token for token in value.split(" ") if token]
    if not tokens or not all(_SCOPE_TOKEN.fullmatch(token) for token in tokens):
        raise OAuthError(400, "invalid_scope", "the scope is malformed")
    return frozenset(tokens)


def _header_values(ex: Exchange, name: bytes) -> list[bytes]:
    return [value for key, value in ex.headers if key.lower() == name]


# --- the endpoints --------------------------------------------------------------------------------------------


class OAuthEndpoints:
    """Token, revocation, introspection and metadata endpoints; `register` adds them to the gateway's own."""

    def __init__(
        self,
        settings: Settings,
        policy: HeaderPolicy,
        auth: Authenticator,
        keys: SigningKeys,
        verifier: AccessTokenVerifier,
        denylist: TokenDenylist,
        worker_id: bytes = b"",
    ) -> None:
        oauth = settings.oauth
        self.settings = oauth
        self.policy = policy
        self.auth = auth
        self.keys = keys
        self.verifier = verifier
        self.denylist = denylist
        self.ttl = oauth.access_token_ttl
        self.issuer = oauth.issuer.rstrip("/")
        self.worker_id = worker_id

    def register(self, own: dict[bytes, OwnEndpoint]) -> None:
        oauth = self.settings
        # RFC 8414 §3: for an issuer with a path, the well-known segment goes between host and path
        issuer_path = urlsplit(self.issuer).path.rstrip("/") if self.issuer else ""
        endpoints: dict[str, OwnEndpoint] = {
            oauth.token_path: self.token,
            oauth.revoke_path: self.revoke,
            oauth.introspect_path: self.introspect,
            METADATA_PATH + issuer_path: self.metadata,
        }
        for path, endpoint in endpoints.items():
            own[path.encode("ascii")] = endpoint

    # --- token (RFC 6749 §4.4) ---

    def token(self, ex: Exchange) -> Respond | Consume:
        return self._form_request(ex) or Consume(FORM_LIMIT, lambda body: self._token_with_body(ex, body))

    async def _token_with_body(self, ex: Exchange, body: bytes) -> Respond:
        try:
            form = parse_form(body)
            client = client_from_request(tuple(_header_values(ex, b"authorization")), form)
            grant_type = form.get("grant_type")
            if grant_type is None:
                raise invalid_request("grant_type is required")
            if grant_type != "client_credentials":
                raise OAuthError(400, "unsupported_grant_type", "only the client_credentials grant is supported")
            requested = parse_scope(form.get("scope"))
            entry = await self._authenticate(ex, client)
            if requested is not None and not requested <= entry.groups:
                raise OAuthError(400, "invalid_scope", "the scope asks for groups the client's owner is not in")
            return self._issue(ex, client, entry, entry.groups if requested is None else requested)
        except OAuthError as err:
            return self.error(ex, err)

    def _issue(self, ex: Exchange, client: ClientAuth, entry: CachedCredential, scope: frozenset[str]) -> Respond:
        now = int(time.time())
        expires = now + self.ttl
        if entry.expires_at is not None:  # a token never outlives its credential
            expires = min(expires, int(entry.expires_at))
        if not self._current_secret(client, entry):  # the old secret of a rotation: only within its grace
            expires = min(expires, int(entry.previous_until))
        if expires <= now:
            raise invalid_client("the client's credential expires now")
        text, _token = self.keys.sign(entry.public_id, entry.current_fp, scope, now, expires)
        self._note(ex).outcome = "ok"
        answer = {
            "access_token": text,
            "token_type": "Bearer",
            "expires_in": expires - now,
            "scope": " ".join(sorted(scope)),
        }
        return self.respond(ex, 200, _json(answer))

    def _current_secret(self, client: ClientAuth, entry: CachedCredential) -> bool:
        presented = client.presented
        digest = self.auth.digest(presented)
        return any(hmac.compare_digest(d, digest) and fp == entry.current_fp for d, fp in entry.digests)

    # --- revocation (RFC 7009) ---

    def revoke(self, ex: Exchange) -> Respond | Consume:
        return self._form_request(ex) or Consume(FORM_LIMIT, lambda body: self._revoke_with_body(ex, body))

    async def _revoke_with_body(self, ex: Exchange, body: bytes) -> Respond:
        try:
            entry, value = await self._client_and_token(ex, body)
            token = self.keys.parse(value)
            if token is None:
                if parse_token(value) is not None or parse_key_secret(value) is not None:
                    raise OAuthError(400, "unsupported_token_type", "credentials are revoked through the admin service")
                return self._revoked(ex)  # §2.2: an invalid token is not an error
            # Another client's token is treated like an unknown one: revocation is no oracle for it.
            live = token.expires_at > time.time() and token.fingerprint == entry.current_fp
            if token.public_id == entry.public_id and live and not self.denylist.is_revoked(token):
                try:
                    await self.denylist.revoke(token, self.ttl)
                except STORE_ERRORS:
                    raise OAuthError(503, "temporarily_unavailable", "retry the revocation later", 5) from None
            return self._revoked(ex)
        except OAuthError as err:
            return self.error(ex, err)

    async def _client_and_token(self, ex: Exchange, body: bytes) -> tuple[CachedCredential, str]:
        """The authenticated client's credential and the `token` parameter (RFC 7009 §2.1, RFC 7662 §2.1)."""
        form = parse_form(body)
        client = client_from_request(tuple(_header_values(ex, b"authorization")), form)
        value = form.get("token")
        if value is None:
            raise invalid_request("token is required")
        return await self._authenticate(ex, client), value

    def _revoked(self, ex: Exchange) -> Respond:
        self._note(ex).outcome = "ok"
        return self.respond(ex, 200, b"", content_type=False)

    # --- introspection (RFC 7662) ---

    def introspect(self, ex: Exchange) -> Respond | Consume:
        return self._form_request(ex) or Consume(FORM_LIMIT, lambda body: self._introspect_with_body(ex, body))

    async def _introspect_with_body(self, ex: Exchange, body: bytes) -> Respond:
        try:
            entry, value = await self._client_and_token(ex, body)
            self._note(ex).outcome = "ok"
            token = self.keys.parse(value)
            # A client may introspect its own tokens only; anything else reads as inactive.
            if token is None or token.public_id != entry.public_id:
                return self.respond(ex, 200, b'{"active":false}')
            found = self.verifier.check(token)
            grant = found if isinstance(found, Verdict) else await found
            if grant.outcome == "unavailable":
                raise OAuthError(503, "temporarily_unavailable", "retry later", grant.retry_after)
            if grant.outcome != "ok" or grant.entry is None:
                return self.respond(ex, 200, b'{"active":false}')
            answer: dict[str, Any] = {
                "active": True,
                "scope": " ".join(sorted(grant.scope)),
                "client_id": client_id_for(token.public_id),
                "username": grant.entry.owner_name,
                "token_type": "Bearer",
                "exp": token.expires_at,
                "iat": token.issued_at,
                "sub": client_id_for(token.public_id),
                "jti": token.jti,
            }
            issuer = self._issuer(ex)
            if issuer:
                answer["iss"] = issuer
            return self.respond(ex, 200, _json(answer))
        except OAuthError as err:
            return self.error(ex, err)

    # --- metadata (RFC 8414) ---

    def metadata(self, ex: Exchange) -> Respond:
        if ex.method not in (b"GET", b"HEAD"):
            answer = self.error(ex, invalid_request("use GET"))
            answer.status = 405
            answer.headers.append((b"Allow", b"GET, HEAD"))
            return answer
        issuer = self._issuer(ex)
        if not issuer:
            return self.error(ex, invalid_request("cannot tell the issuer from the Host header; set oauth.issuer"))
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(issuer))
        oauth = self.settings
        document = {
            "issuer": issuer,
            "token_endpoint": origin + oauth.token_path,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "revocation_endpoint": origin + oauth.revoke_path,
            "revocation_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "introspection_endpoint": origin + oauth.introspect_path,
            "introspection_endpoint_auth_methods_supported": list(AUTH_METHODS),
            # response_types_supported is left out: no grant here uses an authorization endpoint, and §3.2
            # says claims with zero elements are omitted (RFC 8414 erratum 7793).
        }
        self._note(ex).outcome = "none"
        return self.respond(ex, 200, _json(document))

    # --- shared steps ---

    def _form_request(self, ex: Exchange) -> Respond | None:
        """An error answer unless this is a POST of a form (checked before the body is read)."""
        if ex.method != b"POST":
            answer = self.error(ex, invalid_request("this endpoint accepts POST only"))
            answer.headers.append((b"Allow", b"POST"))
            return answer
        types = _header_values(ex, b"content-type")
        if len(types) != 1 or types[0].partition(b";")[0].strip().lower() != _FORM_TYPE:
            return self.error(ex, invalid_request("send the parameters as application/x-www-form-urlencoded"))
        return None

    async def _authenticate(self, ex: Exchange, client: ClientAuth) -> CachedCredential:
        """The client's credential after the same checks as a proxied request (throttle included)."""
        note = self._note(ex)
        note.method = client.method
        found = self.auth.check(client.presented, ex.client_ip)
        verdict = found if isinstance(found, Verdict) else await found
        entry = verdict.entry
        if entry is not None:
            note.credential, note.credential_id = entry.public_id, entry.credential_id
            note.owner, note.creator = entry.owner_name, entry.creator
        outcome = verdict.outcome
        if outcome == "ok" and entry is not None:
            return entry
        if outcome == "expired":
            raise invalid_client("the client's credential has expired")
        if outcome == "suspended":
            raise invalid_client("the client's owner is suspended")
        if outcome == "throttled":
            raise OAuthError(429, "too_many_requests", "too many failed attempts; retry later", verdict.retry_after)
        if outcome == "unavailable":
            raise OAuthError(503, "temporarily_unavailable", "credential store unavailable", verdict.retry_after)
        raise invalid_client()

    def _issuer(self, ex: Exchange) -> str:
        """oauth.issuer, else the origin this request was sent to (believing forwarded headers only from a
        trusted proxy); empty when the Host is unusable."""
        if self.issuer:
            return self.issuer
        scanned = scan_request_headers(self.policy, ex.headers)
        proto, host = "http", scanned.host
        if self.policy.peer(ex.client_ip)[0]:
            forwarded_proto = _first(scanned.x_forwarded_proto)
            if forwarded_proto in ("http", "https"):
                proto = forwarded_proto
            host = (_first(scanned.x_forwarded_host) or "").encode() or host
        text = (host or b"").decode("latin-1")
        return f"{proto}://{text}" if _HOST.fullmatch(text) else ""

    @staticmethod
    def _note(ex: Exchange) -> Note:
        note = ex.note
        if note is None:
            note = ex.note = Note(b"-", b"-")
        return note

    def respond(self, ex: Exchange, status: int, body: bytes, content_type: bool = True) -> Respond:
        headers = [NO_STORE, PRAGMA, (b"X-Request-Id", self._note(ex).request_id)]
        if content_type:
            headers.insert(0, JSON)
        if self.worker_id:
            headers.append((b"X-Credgate-Worker", self.worker_id))
        return Respond(status, headers, body)

    def error(self, ex: Exchange, err: OAuthError) -> Respond:
        note = self._note(ex)
        note.reason = err.error
        note.outcome = {401: "invalid", 429: "throttled", 503: "unavailable"}.get(err.status, "bad_request")
        answer = self.respond(ex, err.status, json_body(err.error, err.description))
        if err.status == 401:
            answer.headers.append(BASIC_CHALLENGE)
        if err.retry_after:
            answer.headers.append((b"Retry-After", str(err.retry_after).encode()))
        return answer


def _first(values: Iterable[bytes]) -> str:
    for value in values:
        return value.split(b",")[0].strip().decode("latin-1").lower()
    return ""


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
