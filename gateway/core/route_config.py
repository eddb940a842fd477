"""Route configuration: the Route and Upstream types and the [[routes]] tables they are read from.

load_settings reads [[routes]] with build_routes; the gateway's route table (gateway.routes) matches requests
against the Routes it returns.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import quote

from gateway.core.rate_policy import Policy, PolicyError, parse_policy
from gateway.core.targets import VISIBLE_ASCII, normalize_target

__all__ = ["Route", "Upstream", "build_routes", "parse_upstream"]


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a route's requests go. Built by parse_upstream from configuration."""

    scheme: str
    host: str
    port: int
    base_path: str = ""
    # Precomputed for the hot path: the Host value "host:port" and the base path as bytes.
    authority: bytes = field(init=False, repr=False, compare=False)
    base_path_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.scheme != "http":
            raise ValueError(f"upstream scheme {self.scheme!r} is not supported; only http is")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"upstream port {self.port} is out of range 1-65535")
        _check_host(self.host)
        if self.base_path:
            normal = normalize_target(self.base_path.encode("ascii", "replace"))
            if normal is None or normal != (self.base_path.encode("ascii"), b"") or self.base_path.endswith("/"):
                raise ValueError(
                    f"upstream base path {self.base_path!r} must be a normalised path "
                    "without a trailing slash, dot segments, '//', ';', '\\', '?' or '#'"
                )
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "authority", f"{host}:{self.port}".encode("ascii"))
        object.__setattr__(self, "base_path_bytes", self.base_path.encode("ascii"))


_HOST_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _check_host(host: str) -> None:
    """Accept an IP literal or a DNS-style name (underscores allowed: container service names use them)."""
    if not host:
        raise ValueError("upstream host is empty")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"upstream host {host!r} is not a valid IPv6 address") from None
        return
    if not _HOST_CHARS.issuperset(host) or any(not label for label in host.removesuffix(".").split(".")):
        raise ValueError(
            f"upstream host {host!r} is not a valid host name or IP address "
            "(use the punycode form for internationalised names)"
        )


def parse_upstream(url: str) -> Upstream:
    """Parse "http://host[:port][/base/path]" into an Upstream; ValueError says what is wrong.

    Messages name only the offending component, never the whole URL, so a URL carrying a password in
    its userinfo is not echoed into logs.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ValueError("upstream must be an absolute URL such as http://127.0.0.1:9000")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise ValueError("upstream URL must not contain user information (user:password@)")
    if not url.isascii() or any(char <= " " or char == "\x7f" for char in url):
        raise ValueError("upstream URL must be ASCII without spaces or control characters")
    if scheme.lower() != "http":
        raise ValueError(f"upstream scheme {scheme!r} is not supported; use http://")
    if "?" in rest or "#" in rest:
        raise ValueError("upstream URL must not contain a query or fragment")
    host, port = _split_authority(authority)
    base_path = (slash + path).rstrip("/")
    if "//" in slash + path:
        raise ValueError(f"upstream base path {slash + path!r} must not contain '//'")
    return Upstream(scheme="http", host=host, port=port, base_path=base_path)


def _split_authority(authority: str) -> tuple[str, int]:
    if authority.startswith("["):
        end = authority.find("]")
        if end == -1:
            raise ValueError(f"upstream host {authority!r} has an unclosed '['")
        host, after = authority[1:end], authority[end + 1 :]
        if ":" not in host:
            raise ValueError(f"upstream host {host!r} in brackets is not a valid IPv6 address")
        if after and not after.startswith(":"):
            raise ValueError(f"unexpected {after!r} after the IPv6 address in the upstream URL")
        port_text = after[1:] if after else None
    elif authority.count(":") > 1:
        raise ValueError(f"upstream host {authority!r}: write IPv6 addresses in brackets, e.g. http://[::1]:9000")
    else:
        host, colon, port_text_or_empty = authority.partition(":")
        port_text = port_text_or_empty if colon else None
    if port_text is None:
        return host, 80
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"upstream port {port_text!r} is not a number in 1-65535")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class Route:
    """One configured route. `prefix` matches on whole path segments; `name` labels metrics."""

    prefix: str
    upstream: Upstream
    auth_required: bool = True
    groups: frozenset[str] = frozenset()
    strip_prefix: bool = False
    preserve_host: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    name: str = ""
    rate_limit: Policy | None = None  # applies to each credential (or each address) on this route
    rate_limit_by: Literal["credential", "address"] = "credential"
    identity_assertion: bool | None = None  # sign Credgate-Identity here; None: identity.assertion decides
    # The prefix as the table matches it: normalised bytes, no trailing slash ("/" for the root route).
    match_key: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "match_key", _prefix_key(self.prefix))
        if not self.name:
            object.__setattr__(self, "name", self.prefix)
        if not (self.connect_timeout > 0 and self.read_timeout > 0):
            raise ValueError(f"route {self.prefix!r}: timeouts must be positive")


def _prefix_key(prefix: str) -> bytes:
    """Turn a configured prefix into its match key; characters outside visible ASCII are UTF-8 escaped."""
    if not prefix.startswith("/"):
        raise ValueError(f"route prefix {prefix!r} must start with '/'")
    raw = quote(prefix, safe="".join(map(chr, VISIBLE_ASCII)).replace("%", "")).encode("ascii")
    normal = normalize_target(raw)
    if normal is None or normal[1] or b"//" in raw or normal[0].rstrip(b"/") != raw.rstrip(b"/"):
        raise ValueError(f"route prefix {prefix!r} must be a normalised path (no ; % \\ # ? '//' or dot segments)")
    return raw.rstrip(b"/") or b"/"


_ROUTE_KEYS = {
    "prefix",
    "upstream",
    "auth",
    "groups",
    "strip_prefix",
    "preserve_host",
    "connect_timeout",
    "read_timeout",
    "name",
    "rate_limit",
    "rate_limit_by",
    "identity_assertion",
}


def build_routes(raw_routes: Any, problems: list[str]) -> list[Route]:
    """The [[routes]] tables of a configuration file; every problem is appended to `problems`."""
    if not isinstance(raw_routes, list):
        problems.append("routes: must be an array of tables ([[routes]]); see config/credgate.example.toml")
        return []
    routes: list[Route] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_routes):
        where = f"routes[{index}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a table with prefix and upstream")
            continue
        route = _build_route(raw, where, seen, problems)
        if route is not None:
            routes.append(route)
    return routes


def _route_prefix(raw: dict[str, Any], where: str, seen: set[str], problems: list[str]) -> str:
    prefix = raw.get("prefix")
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        problems.append(f"{where}.prefix: a path starting with '/' is required, e.g. prefix = \"/api\"")
        prefix = "/"
    elif any(c in prefix for c in ";%\\#?") or "//" in prefix or "/./" in prefix + "/" or "/../" in prefix + "/":
        problems.append(
            f"{where}.prefix: {prefix!r} must be a plain normalised path (no ; % \\ # ? // or dot segments)"
        )
    normal = prefix.rstrip("/") or "/"
    if normal in seen:
        problems.append(f"{where}.prefix: {normal!r} is defined twice; keep one route per prefix")
    seen.add(normal)
    return normal


def _route_upstream(raw: dict[str, Any], where: str, problems: list[str]) -> Upstream | None:
    text = raw.get("upstream")
    if not isinstance(text, str):
        problems.append(f'{where}.upstream: a URL is required, e.g. upstream = "http://127.0.0.1:9000"')
        return None
    try:
        return parse_upstream(text)
    except ValueError as exc:
        problems.append(f"{where}.upstream: {exc}")
        return None


def _build_route(raw: dict[str, Any], where: str, seen: set[str], problems: list[str]) -> Route | None:
    """One [[routes]] table, or None with its problems appended."""
    before = len(problems)
    for key in raw:
        if key not in _ROUTE_KEYS:
            problems.append(f"{where}.{key}: unknown key; allowed: {', '.join(sorted(_ROUTE_KEYS))}")
    normal = _route_prefix(raw, where, seen, problems)
    upstream = _route_upstream(raw, where, problems)
    auth = raw.get("auth", "required")
    if auth not in ("required", "none"):
        problems.append(f'{where}.auth: must be "required" or "none", got {auth!r}')
    groups = raw.get("groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
        problems.append(f'{where}.groups: a list of group names expected, e.g. groups = ["finance"]')
        groups = []
    flags = {key: raw.get(key, False) for key in ("strip_prefix", "preserve_host")}
    problems.extend(f"{where}.{key}: true or false expected" for key, v in flags.items() if not isinstance(v, bool))
    timeouts = {}
    for key, default in (("connect_timeout", 5.0), ("read_timeout", 60.0)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            problems.append(f"{where}.{key}: a positive number of seconds expected")
            value = default
        timeouts[key] = float(value)
    name = raw.get("name") or normal
    if not isinstance(name, str):
        problems.append(f"{where}.name: a string expected")
        name = normal
    rate_limit, rate_limit_by = _route_rate_limit(raw, where, auth == "required", problems)
    assertion = raw.get("identity_assertion")
    if assertion is not None and not isinstance(assertion, bool):
        problems.append(f"{where}.identity_assertion: true or false expected")
    if len(problems) > before or upstream is None:
        return None
    return Route(
        prefix=normal,
        upstream=upstream,
        auth_required=auth == "required",
        groups=frozenset(groups),
        strip_prefix=bool(flags["strip_prefix"]),
        preserve_host=bool(flags["preserve_host"]),
        connect_timeout=timeouts["connect_timeout"],
        read_timeout=timeouts["read_timeout"],
        name=name,
        rate_limit=rate_limit,
        rate_limit_by=rate_limit_by,
        identity_assertion=assertion,
    )


def _route_rate_limit(
    raw: dict[str, Any], where: str, auth_required: bool, problems: list[str]
) -> tuple[Policy | None, Literal["credential", "address"]]:
    """`rate_limit = "1000/minute"`, counted per credential (the default where auth is required) or per client
    address (`rate_limit_by = "address"`, the only choice on an `auth = "none"` route)."""
    text = raw.get("rate_limit")
    policy = None
    if text is not None:
        try:
            policy = parse_policy(text, "rate") if isinstance(text, str) else None
        except PolicyError as exc:
            problems.append(f"{where}.rate_limit: {exc}")
        else:
            if policy is None:
                problems.append(f'{where}.rate_limit: a string expected, e.g. rate_limit = "1000/minute"')
    by = raw.get("rate_limit_by", "credential" if auth_required else "address")
    if by not in ("credential", "address"):
        problems.append(f'{where}.rate_limit_by: must be "credential" or "address", got {by!r}')
        by = "address"
    elif by == "credential" and not auth_required:
        problems.append(f'{where}.rate_limit_by: an auth = "none" route has no credential to count; use "address"')
    return policy, by
