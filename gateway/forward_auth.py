"""Forward-auth: the gateway's decision for edge proxies that keep their own data path.

A private listener (`forward_auth.listen`, off by default; only `forward_auth.trusted_proxies` may ask, anyone
else gets 403 with nothing decided) answers "who is this, and may they pass?" for nginx `auth_request`,
Traefik ForwardAuth, Caddy `forward_auth` and Envoy `ext_authz`. Each sends the original request its own way
(ENDPOINTS); the original URI is normalised and matched against the same route table, and the decision runs
the same extraction, caches, throttle, rate limits, metrics, access log and usage as the gateway's. Allowed:
200 with the identity headers (and the RateLimit fields) for the proxy to copy onto the upstream request;
the credential is never echoed. Denied: the gateway's own 401/403/429/503 answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Sequence

from gateway.app import Gateway
from gateway.core.route_config import Route
from gateway.entry import CachedCredential
from gateway.headers import ScannedHeaders, describe_peer
from gateway.http.exchange import Consume, Exchange, Forward, Note, Respond

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Where each proxy puts the original method and URI (None: the auth request's own method; Envoy appends
# the original path to path_prefix).
NGINX = (b"x-original-method", b"x-original-uri")
FORWARDED = (b"x-forwarded-method", b"x-forwarded-uri")
ENDPOINTS: dict[bytes, tuple[bytes, bytes] | None] = {b"/nginx": NGINX, b"/traefik": FORWARDED, b"/caddy": FORWARDED}
ENVOY_PREFIX = b"/envoy"


def only(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of a header sent exactly once (None when missing, repeated or empty)."""
    found = [value for key, value in headers if key.lower() == name]
    return found[0].strip() or None if len(found) == 1 else None


def client_of(ex: Exchange, endpoint: bytes) -> str:
    """The client's address as the trusted proxy set it; the peer (the proxy) when it set none.

    nginx's auth_request passes the client's own headers on, so for /nginx only X-Real-IP counts, which
    deploy/forward-auth/nginx.conf sets from $remote_addr (replacing any client copy). Traefik, Caddy and
    Envoy append the peer they saw to X-Forwarded-For: its last hop. Never an address the client chose.
    """
    if endpoint == b"/nginx":
        raw = only(ex.headers, b"x-real-ip") or b""
    else:
        forwarded = [v for k, v in ex.headers if k.lower() == b"x-forwarded-for"]
        raw = forwarded[-1].rsplit(b",", 1)[-1] if forwarded else b""
    try:
        return str(ipaddress.ip_address(raw.strip().decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        return ex.client_ip


class ForwardAuth(Gateway):
    """The Gateway's request path with `admit` answering 200 instead of forwarding."""

    def configure_peers(self, trusted: Sequence[str]) -> None:
        self.trusted: tuple[Network, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)
        self._peers: dict[str, bool] = {}

    def is_trusted(self, address: str) -> bool:
        """Whether the peer is a trusted proxy, judged as the gateway judges X-Forwarded-For senders (IPv4-mapped
        IPv6 addresses of a dual-stack listener included)."""
        known = self._peers.get(address)
        if known is None:
            known = describe_peer(address, self.trusted)[0]
            if len(self._peers) < 4096:
                self._peers[address] = known
        return known

    def handle(self, ex: Exchange) -> Respond | Forward | Consume | Awaitable[Respond | Forward]:
        if not self.is_trusted(ex.client_ip):
            note = ex.note = Note(b"-", b"-")
            return self.refuse(note, "forbidden", 403, "forbidden", "not a trusted proxy for forward-auth")
        path = ex.target.partition(b"?")[0]
        # throttles, address limits and the access log count the client, not the proxy
        ex.client_ip = client_of(ex, path)
        if path == ENVOY_PREFIX or path.startswith(ENVOY_PREFIX + b"/"):
            return self.route_request(ex, ex.target[len(ENVOY_PREFIX):] or b"/", ex.method)
        names = ENDPOINTS.get(path)
        if names is None:
            note = ex.note = Note(b"-", b"-")
            return self.refuse(note, "none", 404, "not_found",
                               "forward-auth endpoints: /nginx, /traefik, /caddy, /envoy/...")
        method, uri = only(ex.headers, names[0]), only(ex.headers, names[1])
        if method is None or uri is None or not uri.startswith(b"/"):
            note = ex.note = Note(b"-", b"-")
            return self.refuse(note, "bad_request", 400, "invalid_request",
                               f"missing or ambiguous {names[0].decode()} / {names[1].decode()}")
        return self.route_request(ex, uri, method)

    def admit(
        self,
        ex: Exchange,
        route: Route,
        scanned: ScannedHeaders,
        note: Note,
        identity: bytes,
        entry: CachedCredential | None = None,
        limit_fields: bytes = b"",
    ) -> Respond:
        note.outcome = "ok" if identity else "none"
        headers = [(b"X-Request-Id", note.request_id), (b"Cache-Control", b"no-store")]
        for line in (identity + limit_fields).split(b"\r\n"):
            name, sep, value = line.partition(b": ")
            if sep:
                headers.append((name, value))
        return Respond(200, headers, b"")
