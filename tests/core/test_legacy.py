"""gateway.core.legacy and the legacy shapes in gateway.core.formats (pure): schemes, lookup keys, what is refused."""

from __future__ import annotations

import base64
import hashlib

import bcrypt
import pytest

from gateway.core import formats, legacy

TOKEN = "legacy-3f9a1c7e5b2d8a04c6e1f7b9"
KEY = b"server-key-" + b"k" * 32


def pbkdf2(secret: str, salt: str = "NaCl1234", iterations: int = 1000) -> str:
    raw = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(raw).decode()}"


def stored(scheme: legacy.Scheme, secret: str) -> str:
    if scheme == "bcrypt":
        value = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(4)).decode()
    elif scheme == "pbkdf2_sha256":
        value = pbkdf2(secret)
    else:
        value = hashlib.new(scheme, secret.encode()).hexdigest().upper()  # any case is accepted
    assert legacy.hash_problem(scheme, value) == ""
    return legacy.stored_form(scheme, value)


@pytest.mark.parametrize("scheme", legacy.SCHEMES)
def test_each_scheme_verifies_the_right_secret_only(scheme: legacy.Scheme) -> None:
    hashed = stored(scheme, TOKEN)
    assert legacy.is_legacy_hash(hashed) and legacy.scheme_of(hashed) == scheme
    assert legacy.verify(hashed, TOKEN)
    assert not legacy.verify(hashed, TOKEN + "x")
    assert not legacy.verify(hashed, "")
    assert legacy.is_slow(hashed) == (scheme in ("bcrypt", "pbkdf2_sha256"))


def test_bcrypt_reads_72_bytes_like_the_systems_it_comes_from() -> None:
    long_secret = "a" * 80
    hashed = legacy.stored_form("bcrypt", bcrypt.hashpw(long_secret[:72].encode(), bcrypt.gensalt(4)).decode())
    assert legacy.verify(hashed, long_secret)


@pytest.mark.parametrize(
    ("scheme", "value"),
    [
        pytest.param("sha256", "ab" * 31, id="sha256-short"),
        pytest.param("sha256", "zz" * 32, id="sha256-not-hex"),
        pytest.param("sha512", "ab" * 32, id="sha512-as-sha256"),
        pytest.param("bcrypt", "$2b$12$tooshort", id="bcrypt-short"),
        pytest.param("pbkdf2_sha256", "pbkdf2_sha256$999$salt$" + "A" * 43 + "=", id="pbkdf2-few-iterations"),
        pytest.param("pbkdf2_sha256", "pbkdf2_sha256$1000$salt$abc", id="pbkdf2-short-hash"),
        pytest.param("md5", "ab" * 16, id="unknown-scheme"),
    ],
)
def test_malformed_hashes_are_named_without_their_value(scheme: str, value: str) -> None:
    problem = legacy.hash_problem(scheme, value)
    assert problem and value not in problem


def test_anything_but_a_legacy_hash_never_verifies() -> None:
    assert legacy.scheme_of("$argon2id$v=19$m=1024,t=1,p=1$abc$def") is None
    assert not legacy.verify("$argon2id$v=19$m=1024,t=1,p=1$abc$def", TOKEN)
    assert not legacy.verify("legacy$md5$" + hashlib.md5(TOKEN.encode()).hexdigest(), TOKEN)  # noqa: S324
    assert not legacy.verify("legacy$bcrypt$garbage", TOKEN)


def test_lookup_keys_are_keyed_or_the_unsalted_hash_itself() -> None:
    keyed = legacy.token_lookup(KEY, TOKEN)
    assert keyed.startswith("h:") and TOKEN not in keyed and keyed != legacy.token_lookup(b"other", TOKEN)
    sha256, sha512 = legacy.unsalted_lookups(TOKEN)
    assert sha256 == legacy.hash_lookup("sha256", hashlib.sha256(TOKEN.encode()).hexdigest().upper())
    assert sha512 == "sha512:" + hashlib.sha512(TOKEN.encode()).hexdigest()
    assert legacy.client_lookup("AKIA123") == "k:AKIA123"
    with pytest.raises(ValueError, match="server key"):
        legacy.token_lookup(b"", TOKEN)


@pytest.mark.parametrize(
    ("value", "legacy_shaped"),
    [
        pytest.param(TOKEN, True, id="stripe-like"),
        pytest.param("x" * 16, True, id="shortest"),
        pytest.param("x" * 15, False, id="too-short"),
        pytest.param("x" * 257, False, id="too-long"),
        pytest.param("abc def ghi jkl mno", False, id="space"),
        pytest.param("abcdefghijklmnop\x01", False, id="control"),
        pytest.param("abcdefghijklmnopé", False, id="not-ascii"),
        pytest.param("cgt_" + "A" * 44, False, id="credgate-token-prefix"),
        pytest.param("CGT_" + "A" * 44, False, id="credgate-prefix-upper"),
        pytest.param("cgx_" + "A" * 44, False, id="any-cg-prefix"),
    ],
)
def test_what_may_be_a_legacy_token(value: str, legacy_shaped: bool) -> None:
    assert formats.is_legacy_token(value) is legacy_shaped
    raw = value.encode("utf-8")
    parsed = formats.parse_legacy_token(raw)
    assert (parsed is not None) is legacy_shaped
    if parsed is not None:
        assert parsed.kind == "token" and parsed.public_id == "" and parsed.secret == value
        assert value not in repr(parsed)


def test_legacy_key_pairs() -> None:
    pair = formats.parse_legacy_key_pair(b"AKIAIOSFODNN7EXAMPLE", b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert pair is not None and pair.kind == "key" and pair.client_id == "AKIAIOSFODNN7EXAMPLE"
    assert "wJalr" not in repr(pair)
    assert formats.parse_legacy_key_pair(b"cgk_whatever", b"x" * 20) is None  # ours, malformed
    assert formats.parse_legacy_key_pair(b"a:b", b"x" * 20) is None
    assert formats.parse_legacy_key_pair(b"", b"x" * 20) is None
    assert formats.parse_legacy_key_pair(b"client", b"short") is None
    assert formats.parse_legacy_key_pair(b"client", formats.generate_key_secret().encode()) is not None
