"""Route table and safe request-target normalisation: the path the gateway matches is the path it forwards."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote, unquote_to_bytes

__all__ = ["Route", "RouteTable", "Upstream", "normalize_target", "parse_upstream", "upstream_path"]

_VISIBLE_ASCII: Final = bytes(range(0x21, 0x7F))
# Bytes allowed raw in a path. `;` is refused because path parameters are how `..;/` reaches past a
# prefix on Tomcat/Spring; `\` because IIS and some Java containers read it as `/`; `#` never belongs in
# a request. `bytes.translate(None, allowed)` leaves exactly the refused bytes, in one C loop.
_PATH_ALLOWED: Final = _VISIBLE_ASCII.translate(None, b";\\#")
_QUERY_ALLOWED: Final = _VISIBLE_ASCII.translate(None, b"#")
_UNRESERVED: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Escapes refused outright: `/` and `\` would let a server that decodes before routing see a different
# path; `%` (%25) is how double-decoding servers are fooled; `;` as above; `?` and `#` because a server
# or rewriting proxy that decodes before splitting would cut the path short there ("/admin%3F" -> "/admin");
# controls have no use in a path.
_REFUSED_ESCAPES: Final = frozenset({*range(0x20), 0x7F, *b"/\\%;?#"})
# Characters that a Unicode-normalising upstream (NFKC, Windows "best fit") could turn into a delimiter.
_DELIMITERS: Final = frozenset("/\\.;%")


# A target that needs no work at all: segments that neither are empty nor start with "." (so no "//" and
# no dot segment), no escapes, no refused byte, a query without "#". One C-level match decides the
# common case; everything else takes the step-by-step path below, which returns such targets unchanged.
_PLAIN_TARGET: Final = re.compile(
    rb"(?=/)(?:/[A-Za-z0-9\-_~!$&'()*+,=:@\[\]{}|^`\"<>][A-Za-z0-9\-._~!$&'()*+,=:@\[\]{}|^`\"<>]*)*/?"
    rb"(\?[!-\"$-~]*)?"
)


def _build_escape_table() -> dict[bytes, bytes]:
    """Map every two-hex-digit pair (any case) to what replaces `%XX`; b"" means refused."""
    table: dict[bytes, bytes] = {}
    hex_digits = b"0123456789abcdefABCDEF"
    for high in hex_digits:
        for low in hex_digits:
            pair = bytes((high, low))
            value = int(pair, 16)
            if value in _REFUSED_ESCAPES:
                table[pair] = b""
            elif value in _UNRESERVED:
                table[pair] = bytes((value,))
            else:
                table[pair] = b"%" + pair.upper()
    return table


_ESCAPES: Final = _build_escape_table()
_NON_ASCII_ESCAPES: Final = frozenset(pair for pair in _ESCAPES if int(pair, 16) >= 0x80)


def normalize_target(target: bytes) -> tuple[bytes, bytes] | None:
    """Split and normalise a request target into (path, query with its '?' or b""); None means 400.

    The returned path is both what the route table matches and what goes upstream, so no upstream,
    however it decodes or resolves paths, can see a different path than the one that was authorised.
    """
    plain = _PLAIN_TARGET.fullmatch(target)
    if plain is not None:
        query_start = plain.start(1)
        if query_start == -1:
            return target, b""
        return target[:query_start], target[query_start:]
    return _normalize_steps(target)


def _normalize_steps(target: bytes) -> tuple[bytes, bytes] | None:
    """Apply every rule one by one; the result for plain targets equals the shortcut above."""
    if target[:1] != b"/":
        origin = _origin_form(target)
        if origin is None:
            return None
        target = origin
    path, question, query = target.partition(b"?")
    if path.translate(None, _PATH_ALLOWED) or query.translate(None, _QUERY_ALLOWED):
        return None
    if b"%" in path:
        decoded = _decode_escapes(path)
        if decoded is None:
            return None
        path = decoded
    if b"//" in path or b"/." in path:
        resolved = _resolve_segments(path)
        if resolved is None:
            return None
        path = resolved
    return path, question + query


def _origin_form(target: bytes) -> bytes | None:
    """Return the origin-form part of an absolute-form target (RFC 9112 §3.2.2); None for anything else."""
    scheme_end = target.find(b"://", 0, 8)
    if scheme_end == -1 or target[:scheme_end].lower() not in (b"http", b"https"):
        return None  # asterisk-form, authority-form and other schemes are not proxied
    rest = target[scheme_end + 3 :]
    end = len(rest)
    for delimiter in b"/?":
        found = rest.find(delimiter)
        if found != -1 and found < end:
            end = found
    authority = rest[:end]
    # Userinfo is deprecated in http URIs (RFC 9110 §4.2.4) and only ever used to confuse readers.
    if not authority or b"@" in authority or authority.translate(None, _PATH_ALLOWED):
        return None
    rest = rest[end:]
    return rest if rest[:1] == b"/" else b"/" + rest


def _decode_escapes(path: bytes) -> bytes | None:
    """Decode escaped unreserved characters, refuse dangerous or malformed escapes, uppercase the rest."""
    pieces = path.split(b"%")
    out = [pieces[0]]
    non_ascii = False
    for piece in pieces[1:]:
        pair = piece[:2]
        replacement = _ESCAPES.get(pair)
        if not replacement:  # missing: not two hex digits; empty: a refused byte
            return None
        if pair in _NON_ASCII_ESCAPES:
            non_ascii = True
        out.append(replacement)
        out.append(piece[2:])
    decoded = b"".join(out)
    if non_ascii and not _safe_non_ascii(decoded):
        return None
    return decoded


def _safe_non_ascii(path: bytes) -> bool:
    """Refuse escaped bytes that are not UTF-8 or that look like a delimiter after Unicode normalisation.

    Overlong forms such as %C0%AE and compatibility characters such as U+FF0F (fullwidth solidus) or
    U+2024 (one dot leader) become `.` or `/` on servers that decode leniently or apply NFKC.
    """
    try:
        text = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    for char in set(text):
        if char > "\x7f" and not _DELIMITERS.isdisjoint(unicodedata.normalize("NFKC", char)):
            return False
    return True


def _resolve_segments(path: bytes) -> bytes | None:
    """Merge repeated slashes and remove dot segments (RFC 3986 §5.2.4); None when `..` climbs above root."""
    kept: list[bytes] = []
    trailing_slash = False
    for segment in path.split(b"/")[1:]:
        trailing_slash = True
        if segment == b"" or segment == b".":
            continue
        if segment == b"..":
            if not kept:
                return None
            kept.pop()
            continue
        # Windows strips trailing dots and spaces from names, so `...` or `..%20` can act as `..` there.
        if segment[:1] == b"." and not segment.replace(b"%20", b"").strip(b"."):
            return None
        kept.append(segment)
        trailing_slash = False
    if not kept:
        return b"/"
    return b"/" + b"/".join(kept) + (b"/" if trailing_slash else b"")


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
    raw = quote(prefix, safe="".join(map(chr, _VISIBLE_ASCII)).replace("%", "")).encode("ascii")
    normal = normalize_target(raw)
    if normal is None or normal[1] or b"//" in raw or normal[0].rstrip(b"/") != raw.rstrip(b"/"):
        raise ValueError(f"route prefix {prefix!r} must be a normalised path (no ; % \\ # ? '//' or dot segments)")
    return raw.rstrip(b"/") or b"/"


class RouteTable:
    """Longest-prefix route lookup on whole segments: "/api" matches "/api", "/api/x", never "/apix"."""

    __slots__ = ("_by_key", "_key_lengths", "_longest", "_root", "routes")

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        self._by_key: dict[bytes, Route] = {}
        for route in self.routes:
            if route.match_key in self._by_key:
                raise ValueError(f"route prefix {route.match_key.decode()!r} is defined twice")
            self._by_key[route.match_key] = route
        self._root = self._by_key.get(b"/")
        self._key_lengths = frozenset(len(key) for key in self._by_key)
        self._longest = max(self._key_lengths, default=0)

    def match(self, path: bytes) -> Route | None:
        """Return the route for a normalised path (from normalize_target), or None when none matches."""
        get = self._by_key.get
        lengths = self._key_lengths
        if len(path) in lengths:
            route = get(path)
            if route is not None:
                return route
        # No key is longer than _longest, so start at the last segment boundary within reach; only
        # slice (and allocate) candidates whose length some key has.
        end = path.rfind(b"/", 0, self._longest + 1)
        while end > 0:
            if end in lengths:
                route = get(path[:end])
                if route is not None:
                    return route
            end = path.rfind(b"/", 0, end)
        return self._root


def upstream_path(route: Route, path: bytes, query: bytes) -> bytes:
    """Build the upstream request target: strip the prefix if asked, prepend the upstream's base path.

    `path` must be the normalised path that `route` matched; the result always starts with "/".
    """
    if route.strip_prefix and route.match_key != b"/":
        path = path[len(route.match_key) :]
    base = route.upstream.base_path_bytes
    if base:
        return base + path + query
    if not path:
        return b"/" + query
    return path + query
