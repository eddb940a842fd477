"""Tests for gateway.core.targets: request-target normalisation and the strings that try to bypass it."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core import targets
from gateway.core.targets import normalize_target

# (request target, expected normalised path, or None for 400). The query is checked separately.
PATH_CASES: list[tuple[bytes, bytes | None]] = [
    # plain targets pass through untouched
    (b"/", b"/"),
    (b"/api", b"/api"),
    (b"/api/", b"/api/"),
    (b"/api/v1/users/123", b"/api/v1/users/123"),
    (b"/a-b_c~d.e/f!$&'()*+,=:@", b"/a-b_c~d.e/f!$&'()*+,=:@"),
    (b"/.well-known/openid-configuration", b"/.well-known/openid-configuration"),
    (b"/x/.hidden", b"/x/.hidden"),
    (b"/a..b/c.", b"/a..b/c."),
    (b"/ADMIN", b"/ADMIN"),  # case-sensitive, as RFC 3986 says paths are
    # request-target forms (RFC 9112 §3.2)
    (b"http://example.com/admin", b"/admin"),
    (b"HTTP://example.com:8080/a/../b", b"/b"),
    (b"https://example.com", b"/"),
    (b"http://example.com?x=1", b"/"),
    (b"http://user:pw@example.com/admin", None),
    (b"http:///admin", None),
    (b"ftp://example.com/x", None),
    (b"*", None),
    (b"example.com:443", None),
    (b"admin", None),
    (b"", None),
    # fragments, raw bytes outside visible ASCII, backslash, path parameters
    (b"/admin#x", None),
    (b"/public#/../admin", None),
    (b"/a b", None),
    (b"/a\tb", None),
    (b"/a\x00b", None),
    (b"/a\x7fb", None),
    (b"/caf\xc3\xa9", None),
    (b"/public\\..\\admin", None),
    (b"/admin\\", None),
    (b"/public/..;/admin", None),
    (b"/admin;jsessionid=1", None),
    (b"/public;/../admin", None),
    # percent-encoding: unreserved characters decoded, hex uppercased, dangerous escapes refused
    (b"/%61dmin", b"/admin"),
    (b"/%41%42%7e%2D%5f", b"/AB~-_"),
    (b"/a%20b", b"/a%20b"),
    (b"/a%3ab%40c", b"/a%3Ab%40c"),
    (b"/caf%c3%a9", b"/caf%C3%A9"),
    (b"/%e6%97%a5%e6%9c%ac", b"/%E6%97%A5%E6%9C%AC"),
    (b"/admin%2f", None),
    (b"/%2fadmin", None),
    (b"/%2Fadmin", None),
    (b"/public%5c..%5cadmin", None),
    (b"/public/%252e%252e/admin", None),
    (b"/%25", None),
    (b"/public%3b/admin", None),
    (b"/admin%3F/x", None),
    (b"/admin%23", None),
    (b"/a%00", None),
    (b"/a%0d%0aX-Injected:%201", None),
    (b"/a%7f", None),
    (b"/a%", None),
    (b"/a%4", None),
    (b"/a%zz", None),
    (b"/a%%41", None),
    (b"/a%u002e", None),
    (b"/a%-1", None),
    # non-UTF-8 and look-alike escapes that lenient or Unicode-normalising servers read as . or /
    (b"/public/%c0%ae%c0%ae/admin", None),
    (b"/public%c0%afadmin", None),
    (b"/a%e9", None),
    (b"/public/%ef%bc%8e%ef%bc%8e/admin", None),
    (b"/public%ef%bc%8fadmin", None),
    (b"/public/%e2%80%a5/admin", None),
    (b"/public/%e2%80%a4%e2%80%a4/admin", None),
    # slashes merged, dot segments removed (RFC 3986 §5.2.4), climbing above the root refused
    (b"//admin", b"/admin"),
    (b"///admin//x///", b"/admin/x/"),
    (b"//", b"/"),
    (b"/./", b"/"),
    (b"/.", b"/"),
    (b"/a/./b", b"/a/b"),
    (b"/a/b/../c", b"/a/c"),
    (b"/a/b/..", b"/a/"),
    (b"/a/b/.", b"/a/b/"),
    (b"/a/b/../", b"/a/"),
    (b"/a/..", b"/"),
    (b"/public/../admin", b"/admin"),
    (b"/public/./../admin/", b"/admin/"),
    (b"/public/%2e%2e/admin", b"/admin"),
    (b"/public/%2E%2e/admin", b"/admin"),
    (b"/public/.%2e/admin", b"/admin"),
    (b"/public/%2e/admin", b"/public/admin"),
    (b"/public//../admin", b"/admin"),
    (b"/..", None),
    (b"/../admin", None),
    (b"/a/../..", None),
    (b"/a/%2e%2e/%2e%2e/etc/passwd", None),
    # segments that Windows trims into "." or ".."
    (b"/public/.../admin", None),
    (b"/public/..%20/admin", None),
    (b"/public/.%20/admin", None),
    (b"/public/%2e%2e%2e/admin", None),
]


@pytest.mark.parametrize(("target", "expected"), PATH_CASES, ids=[repr(case[0]) for case in PATH_CASES])
def test_normalize_target_path(target: bytes, expected: bytes | None) -> None:
    result = normalize_target(target)
    if expected is None:
        assert result is None
    else:
        assert result is not None
        assert result[0] == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/a?x=1&y=%2F..;\\", (b"/a", b"?x=1&y=%2F..;\\")),  # the query is passed through unchanged
        (b"/a?", (b"/a", b"?")),
        (b"/a?%zz%", (b"/a", b"?%zz%")),
        (b"/a?b?c", (b"/a", b"?b?c")),
        (b"/a/../b?x/../y", (b"/b", b"?x/../y")),
        (b"/%61?%61", (b"/a", b"?%61")),
        (b"/a?x#frag", None),
        (b"/a?x y", None),
        (b"/a?x\xff", None),
        (b"/a?x\x00", None),
    ],
)
def test_normalize_target_query(target: bytes, expected: tuple[bytes, bytes] | None) -> None:
    assert normalize_target(target) == expected


# Pieces from which hypothesis builds targets: every delimiter, escape and look-alike the rules treat.
TARGET_PIECES = st.sampled_from([
    b"/", b"//", b".", b"..", b"...", b"a", b"A", b"admin", b"public", b"-", b"~", b"_", b":", b"@", b"+",
    b"%2e", b"%2E", b"%2f", b"%2F", b"%25", b"%5c", b"%3b", b"%3f", b"%23", b"%61", b"%41", b"%7e", b"%20",
    b"%00", b"%0a", b"%", b"%4", b"%zz", b"%c3%a9", b"%C0%AE", b"%ef%bc%8f", b"%e2%80%a4", b"%e6%97%a5",
    b";", b"\\", b"?", b"#", b"&", b"=", b" ", b"\x00", b"\x7f", b"\xff", b"http://h", b"*",
])
TARGETS = st.one_of(
    st.lists(TARGET_PIECES, max_size=12).map(b"".join),
    st.lists(TARGET_PIECES, max_size=12).map(lambda pieces: b"/" + b"".join(pieces)),
    st.binary(max_size=40),
    st.binary(max_size=40).map(lambda raw: b"/" + raw),
)


@settings(max_examples=600, deadline=None)
@given(TARGETS)
@example(b"/public/%2e%2e/admin")
@example(b"/a/b/../..//c/./")
def test_normalize_target_properties(target: bytes) -> None:
    result = normalize_target(target)  # never raises
    assert result == targets._normalize_steps(target)  # the shortcut agrees with the full rules
    if result is None:
        return
    path, query = result
    assert path.startswith(b"/")
    for forbidden in (b"//", b"/./", b"/../", b";", b"\\", b"#", b"%2F", b"%2f", b"%25", b"%5C", b"%3B"):
        assert forbidden not in path
    assert not path.endswith((b"/.", b"/.."))
    assert all(0x21 <= byte <= 0x7E for byte in path + query)
    assert query == b"" or query.startswith(b"?")
    assert normalize_target(path + query) == result  # idempotent
