"""Request header policy: one pass over the client's headers finds what the gateway interprets and strips
hop-by-hop, credential and spoofed headers; identity_block builds the identity header lines set instead.
gateway.request_head puts the upstream request head together from both."""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from gateway.http.framing import HOP_BY_HOP, TCHAR

__all__ = [
    "HeaderPolicy",
    "ScannedHeaders",
    "describe_peer",
    "identity_block",
    "is_websocket_upgrade",
    "make_policy",
    "scan_request_headers",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
HeaderPair = tuple[bytes, bytes]

# Every lookup uses this canonical name: lowercase, with every token character that is not a letter or a
# digit read as "-". CGI, WSGI, PHP and nginx-style backends fold X_Auth_User, X.Auth.User, X~Auth~User and
# X-Auth-User into one HTTP_X_AUTH_USER variable (CGI maps each of the 14 such characters to "_"), so a
# look-alike spelling of a header the gateway interprets or sets must never reach the upstream.
_LOOK_ALIKE_CHARS: Final = b"!#$%&'*+.^_`|~"
_CANON: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ" + _LOOK_ALIKE_CHARS,
                                b"abcdefghijklmnopqrstuvwxyz" + b"-" * len(_LOOK_ALIKE_CHARS))

# Where scan_request_headers collects the values of headers it interprets (index into one list).
(
    _HOST,
    _CONNECTION,
    _UPGRADE,
    _TE,
    _EXPECT,
    _CONTENT_LENGTH,
    _TRANSFER_ENCODING,
    _REQUEST_ID,
    _XFF,
    _XFP,
    _XFH,
    _FORWARDED,
    _VIA,
    _AUTHORIZATION,
    _ACCESS_KEY,
    _SECRET_KEY,
) = range(16)
_SLOT_COUNT: Final = 16
_NOT_RECORDED: Final = -1
# What happens to the header line itself once recorded.
_DROP: Final = 0
_FORWARD: Final = 1
_IF_TRUSTED: Final = 2

# name -> slot. All are removed from the forwarded list: they are hop-by-hop, framing (the data plane
# re-frames), or headers the gateway sets itself from what it recorded.
_RECORDED: Final[dict[bytes, int]] = {
    b"host": _HOST,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"te": _TE,
    # The data plane answers 100-continue itself once the request is authorised, as nginx does.
    b"expect": _EXPECT,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"x-request-id": _REQUEST_ID,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFP,
    b"x-forwarded-host": _XFH,
    b"forwarded": _FORWARDED,
    b"via": _VIA,
}
# The hop-by-hop headers not recorded above, and path overrides honoured by IIS URL Rewrite and Symfony/Zend:
# the upstream would route on those, not on the path the gateway authorised.
_ALWAYS_DROPPED: Final = HOP_BY_HOP.difference(_RECORDED) | {b"x-original-url", b"x-rewrite-url"}
# Client-address and scheme hints the gateway does not set: believed only from a trusted proxy.
_TRUSTED_ONLY: Final = frozenset(
    {
        b"x-real-ip",
        b"x-client-ip",
        b"true-client-ip",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
    }
)
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
_PEER_CACHE_SIZE: Final = 4096
# Connection values repeat; parsing each once saves work on every request. Cleared when full, so a client
# sending endless distinct values costs memory only up to the bound.
_TOKEN_CACHE_SIZE: Final = 256
_token_cache: dict[bytes, frozenset[bytes]] = {}

# How a canonical name is treated: (slot or _NOT_RECORDED, exact lowercase spelling or b"", route).
# With an exact spelling, look-alikes (same canonical name, other spelling) are dropped unrecorded.
_Kind = tuple[int, bytes, int]
# What the scan does with a name as spelled: (slot or _NOT_RECORDED, route). Clients repeat the same
# spellings, so this is cached per spelling and the hot loop does one dict lookup per header.
_Action = tuple[int, int]
_PLAIN: Final[_Action] = (_NOT_RECORDED, _FORWARD)
_LOOK_ALIKE: Final[_Action] = (_NOT_RECORDED, _DROP)
_SPELLING_CACHE_SIZE: Final = 1024


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """Configured header names and trust; build with make_policy. Lookup tables are derived once."""

    identity_headers: tuple[bytes, ...]
    access_key_header: bytes = b"accessKey"
    secret_key_header: bytes = b"secretKey"
    keep_credentials: bool = False
    trusted_proxies: tuple[Network, ...] = ()
    via: bytes = b"1.1 credgate"
    _kinds: dict[bytes, _Kind] = field(init=False, repr=False, compare=False)
    # Canonical names a Connection option may not remove: everything the gateway interprets or sets.
    _protected: frozenset[bytes] = field(init=False, repr=False, compare=False)
    via_line: bytes = field(init=False, repr=False, compare=False)  # "Via: <via>\r\n"
    # client_ip -> (trusted, address for X-Forwarded-For, node for Forwarded "for="); bounded.
    _peers: dict[str, tuple[bool, bytes, bytes]] = field(init=False, repr=False, compare=False)
    _spellings: dict[bytes, _Action] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kinds: dict[bytes, _Kind] = {name: (slot, name, _DROP) for name, slot in _RECORDED.items()}
        kinds.update((name, (_NOT_RECORDED, b"", _DROP)) for name in _ALWAYS_DROPPED)
        kinds.update((name, (_NOT_RECORDED, name, _IF_TRUSTED)) for name in _TRUSTED_ONLY)
        credential_route = _FORWARD if self.keep_credentials else _DROP
        configured = [(b"Authorization", (_AUTHORIZATION, b"authorization", credential_route))]
        for name, slot in ((self.access_key_header, _ACCESS_KEY), (self.secret_key_header, _SECRET_KEY)):
            configured.append((name, (slot, name.lower(), credential_route)))
        # Every client-sent spelling of an identity header goes; identity_block sets the real one.
        configured.extend((name, (_NOT_RECORDED, b"", _DROP)) for name in self.identity_headers)
        for name, kind in configured:
            if not name or name.translate(None, TCHAR):
                raise ValueError(f"header name {name!r} is not a valid HTTP field name")
            canonical = name.translate(_CANON)
            if canonical in kinds:
                raise ValueError(
                    f"header name {name.decode()!r} clashes with a header the gateway "
                    "interprets or sets (names compare case-insensitively, '_', '.', '~' and the other "
                    "non-alphanumeric token characters as '-')"
                )
            kinds[canonical] = kind
        if not self.via or self.via.translate(None, bytes(range(0x20, 0x7F))):
            raise ValueError(f"via {self.via!r} must be printable ASCII, e.g. b'1.1 credgate'")
        protected = frozenset(name for name, kind in kinds.items() if kind[2] != _IF_TRUSTED)
        object.__setattr__(self, "_kinds", kinds)
        object.__setattr__(self, "_protected", protected)
        object.__setattr__(self, "via_line", b"Via: " + self.via + b"\r\n")
        object.__setattr__(self, "_peers", {})
        object.__setattr__(self, "_spellings", {})

    def classify(self, name: bytes) -> _Action:
        """Return (slot, route) for a header name as spelled; cached, bounded against random names."""
        action = self._spellings.get(name)
        if action is None:
            kind = self._kinds.get(name.translate(_CANON))
            if kind is None:
                action = _PLAIN
            elif kind[1] and name.lower() != kind[1]:
                action = _LOOK_ALIKE  # such as X_Forwarded_For: dropped, never believed
            else:
                action = (kind[0], kind[2])
            if len(self._spellings) >= _SPELLING_CACHE_SIZE:
                self._spellings.clear()
            self._spellings[name] = action
        return action

    def peer(self, client_ip: str) -> tuple[bool, bytes, bytes]:
        """Return (is a trusted proxy, address text, RFC 7239 node) for a client address, cached."""
        described = self._peers.get(client_ip)
        if described is None:
            described = describe_peer(client_ip, self.trusted_proxies)
            if len(self._peers) >= _PEER_CACHE_SIZE:
                self._peers.clear()
            self._peers[client_ip] = described
        return described


def make_policy(
    identity_headers: Iterable[str | bytes],
    *,
    access_key_header: str | bytes = b"accessKey",
    secret_key_header: str | bytes = b"secretKey",
    keep_credentials: bool = False,
    trusted_proxies: Iterable[str | Network] = (),
    via: str | bytes = b"1.1 credgate",
) -> HeaderPolicy:
    """Build a HeaderPolicy from configuration values (str or bytes); ValueError on a bad name or network."""
    networks = tuple(
        proxy
        if isinstance(proxy, ipaddress.IPv4Network | ipaddress.IPv6Network)
        else ipaddress.ip_network(proxy, strict=False)
        for proxy in trusted_proxies
    )
    return HeaderPolicy(
        identity_headers=tuple(_ascii(name) for name in identity_headers),
        access_key_header=_ascii(access_key_header),
        secret_key_header=_ascii(secret_key_header),
        keep_credentials=keep_credentials,
        trusted_proxies=networks,
        via=_ascii(via),
    )


def _ascii(value: str | bytes) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else value


def describe_peer(client_ip: str, networks: Sequence[Network]) -> tuple[bool, bytes, bytes]:
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False, b"unknown", b"unknown"  # not an IP (e.g. a Unix socket): RFC 7239 §6.3
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d
    trusted = any(address in network for network in networks if network.version == address.version)
    text = str(address).encode("ascii")
    node = b'"[' + text + b']"' if address.version == 6 else text
    return trusted, text, node


@dataclass(slots=True)
class ScannedHeaders:
    """What one pass over the request headers found.

    `forward` is final: the headers that may go upstream, in arrival order and spelling, with hop-by-hop,
    framing, credential (unless kept), spoofed identity, gateway-set and Connection-named headers
    already removed. Repeated headers are kept as tuples in arrival order; `upgrade`, `te`, `expect` and
    the framing values are the repeated lines joined with ", "; `host` and `request_id` are the first.
    """

    forward: list[HeaderPair]
    authorization: tuple[bytes, ...]
    access_key: tuple[bytes, ...]
    secret_key: tuple[bytes, ...]
    host: bytes | None
    host_count: int
    request_id: bytes | None
    upgrade: bytes | None
    connection_tokens: frozenset[bytes]  # lowercased options from every Connection line
    x_forwarded_for: tuple[bytes, ...]
    x_forwarded_proto: tuple[bytes, ...]
    x_forwarded_host: tuple[bytes, ...]
    forwarded: tuple[bytes, ...]
    via: tuple[bytes, ...]
    expect: bytes | None
    te: bytes | None
    content_length: bytes | None
    transfer_encoding: bytes | None
    trusted_only: tuple[HeaderPair, ...]  # X-Real-IP and kin: forwarded only when the peer is trusted


def scan_request_headers(policy: HeaderPolicy, headers: Iterable[HeaderPair]) -> ScannedHeaders:
    """Classify request headers in one pass: what goes upstream, and what the gateway needs to know."""
    cached_action = policy._spellings.get
    forward: list[HeaderPair] = []
    found: list[tuple[bytes, ...]] = [()] * _SLOT_COUNT
    trusted_only: tuple[HeaderPair, ...] = ()
    for pair in headers:
        action = cached_action(pair[0]) or policy.classify(pair[0])
        if action is _PLAIN:
            forward.append(pair)  # the common case: one dict lookup, no new object
            continue
        slot, route = action
        if slot >= 0:
            found[slot] += (pair[1],)
        if route == _FORWARD:
            forward.append(pair)
        elif route == _IF_TRUSTED:
            trusted_only += (pair,)
    tokens = _connection_tokens(found[_CONNECTION])
    if tokens and not tokens <= policy._protected:
        removable = {token.translate(_CANON) for token in tokens} - policy._protected
        if removable:
            forward = [pair for pair in forward if pair[0].translate(_CANON) not in removable]
            trusted_only = tuple(pair for pair in trusted_only if pair[0].translate(_CANON) not in removable)
    hosts = found[_HOST]
    return ScannedHeaders(
        forward,
        found[_AUTHORIZATION],
        found[_ACCESS_KEY],
        found[_SECRET_KEY],
        hosts[0] if hosts else None,
        len(hosts),
        found[_REQUEST_ID][0] if found[_REQUEST_ID] else None,
        _joined(found[_UPGRADE]) if found[_UPGRADE] else None,
        tokens,
        found[_XFF],
        found[_XFP],
        found[_XFH],
        found[_FORWARDED],
        found[_VIA],
        _joined(found[_EXPECT]) if found[_EXPECT] else None,
        _joined(found[_TE]) if found[_TE] else None,
        _joined(found[_CONTENT_LENGTH]) if found[_CONTENT_LENGTH] else None,
        _joined(found[_TRANSFER_ENCODING]) if found[_TRANSFER_ENCODING] else None,
        trusted_only,
    )


def _joined(values: tuple[bytes, ...]) -> bytes:
    return values[0] if len(values) == 1 else b", ".join(values)


def _connection_tokens(values: tuple[bytes, ...]) -> frozenset[bytes]:
    if not values:
        return _NO_TOKENS
    if len(values) == 1:
        # A handful of values ("keep-alive", "close", "Upgrade") make up nearly all traffic.
        tokens = _token_cache.get(values[0])
        if tokens is None:
            tokens = _parse_tokens(values)
            if len(_token_cache) >= _TOKEN_CACHE_SIZE:
                _token_cache.clear()
            _token_cache[values[0]] = tokens
        return tokens
    return _parse_tokens(values)


def _parse_tokens(values: tuple[bytes, ...]) -> frozenset[bytes]:
    tokens = (token.strip(b" \t").lower() for value in values for token in value.split(b","))
    return frozenset(token for token in tokens if token)


def is_websocket_upgrade(scanned: ScannedHeaders, method: bytes) -> bool:
    """True for a WebSocket handshake (RFC 6455 §4.1): GET, Connection: upgrade, Upgrade: websocket."""
    return (
        method == b"GET"
        and b"upgrade" in scanned.connection_tokens
        and scanned.upgrade is not None
        and b"websocket" in (token.strip(b" \t").lower() for token in scanned.upgrade.split(b","))
    )


# Control characters are removed from identity values: CR/LF/NUL would split or end the header line.
_CONTROLS: Final[dict[int, None]] = dict.fromkeys([*range(0x20), 0x7F])


def identity_block(policy: HeaderPolicy, values: Mapping[str, str | Collection[str] | None]) -> bytes:
    """Build the identity header lines ("Name: value\\r\\n" each), in the policy's order.

    `values` is keyed by identity header name (case-insensitive). None omits the header; a collection
    (the groups) becomes its sorted, comma-joined members, dropping members that contain a comma.
    Values are UTF-8 with control characters removed and surrounding spaces stripped.
    """
    by_name = {name.decode("ascii").lower(): name for name in policy.identity_headers}
    unknown = [key for key in values if key.lower() not in by_name]
    if unknown:
        raise ValueError(f"not configured identity headers: {', '.join(sorted(unknown))}")
    chosen = {by_name[key.lower()]: value for key, value in values.items()}
    lines: list[bytes] = []
    for name in policy.identity_headers:
        value = chosen.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            text = _clean(value)
        else:
            members = {_clean(member) for member in value}
            text = ",".join(sorted(member for member in members if member and "," not in member))
        lines += (name, b": ", text.encode("utf-8"), b"\r\n")
    return b"".join(lines)


def _clean(value: str) -> str:
    return value.translate(_CONTROLS).strip(" ")
