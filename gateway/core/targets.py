"""Safe request-target normalisation: the path the gateway matches is the path it forwards.

Pure and used twice: on the request path before the route table is consulted, and when route prefixes and
upstream base paths are checked at configuration time, so both follow exactly the same rules.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final
from urllib.parse import unquote_to_bytes

__all__ = ["VISIBLE_ASCII", "normalize_target"]

# Visible ASCII: every byte a request target may carry raw (no space, no control, nothing beyond 0x7E).
VISIBLE_ASCII: Final = bytes(range(0x21, 0x7F))
# Bytes allowed raw in a path. `;` is refused because path parameters are how `..;/` reaches past a
# prefix on Tomcat/Spring; `\` because IIS and some Java containers read it as `/`; `#` never belongs in
# a request. `bytes.translate(None, allowed)` leaves exactly the refused bytes, in one C loop.
_PATH_ALLOWED: Final = VISIBLE_ASCII.translate(None, b";\\#")
_QUERY_ALLOWED: Final = VISIBLE_ASCII.translate(None, b"#")
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
