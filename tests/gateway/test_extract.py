"""gateway.extract: which credential a request presents, from the values of its credential headers (pure, no I/O).

extract() receives every value of Authorization, accessKey and secretKey, already collected by header name;
matching header names whatever their case is gateway.headers' job (tests/gateway/test_headers.py).
"""

from __future__ import annotations

import base64
from typing import Literal

import pytest

from gateway.core.formats import Presented, client_id_for, generate_key_secret, generate_token
from gateway.extract import (
    HALF_PAIR,
    MISSING,
    REPEATED,
    TWO_CREDENTIALS,
    PresentedAccessToken,
    Refusal,
    extract,
    shortcut,
)

PUBLIC_ID = "AbCdEf012345"
TOKEN = generate_token(PUBLIC_ID).encode()
CLIENT_ID = client_id_for(PUBLIC_ID).encode()
SECRET = generate_key_secret().encode()
# Shaped like an OAuth2 access token (prefix, base64url alphabet, length); extract never checks its signature.
ACCESS_TOKEN = b"cga_" + b"A" * 130

AS_TOKEN = Presented("token", PUBLIC_ID, TOKEN.decode())
AS_KEY_PAIR = Presented("key", PUBLIC_ID, SECRET.decode())


def basic(user_and_password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user_and_password)


def flip_last(value: bytes) -> bytes:
    """The same value with a wrong checksum (its last character changed)."""
    return value[:-1] + (b"A" if value[-1:] != b"A" else b"B")


def malformed(method: Literal["bearer", "basic", "headers"]) -> Refusal:
    return Refusal("malformed", method, "")


Headers = tuple[tuple[bytes, ...], tuple[bytes, ...], tuple[bytes, ...]]


def authorization(*values: bytes) -> Headers:
    return values, (), ()


def key_pair(access_key: tuple[bytes, ...], secret_key: tuple[bytes, ...]) -> Headers:
    return (), access_key, secret_key


PRESENTED = [
    pytest.param(authorization(b"Bearer " + TOKEN), AS_TOKEN, "bearer", id="bearer"),
    pytest.param(key_pair((CLIENT_ID,), (SECRET,)), AS_KEY_PAIR, "headers", id="key-pair-headers"),
    pytest.param(authorization(basic(CLIENT_ID + b":" + SECRET)), AS_KEY_PAIR, "basic", id="basic"),
    # The scheme is case-insensitive (RFC 9110); spaces around the value and after the scheme are ignored.
    pytest.param(authorization(b"bearer " + TOKEN), AS_TOKEN, "bearer", id="bearer-lower-case"),
    pytest.param(authorization(b"BEARER " + TOKEN), AS_TOKEN, "bearer", id="bearer-upper-case"),
    pytest.param(authorization(b"bAsIc " + basic(CLIENT_ID + b":" + SECRET)[6:]), AS_KEY_PAIR, "basic",
                 id="basic-mixed-case"),
    pytest.param(authorization(b"  Bearer   " + TOKEN + b"  "), AS_TOKEN, "bearer", id="bearer-extra-spaces"),
    pytest.param(authorization(b"\tBearer " + TOKEN + b"\r\n"), AS_TOKEN, "bearer", id="surrounding-whitespace"),
    pytest.param(key_pair((b" " + CLIENT_ID + b" ",), (b"\t" + SECRET,)), AS_KEY_PAIR, "headers",
                 id="key-pair-whitespace"),
]


@pytest.mark.parametrize(("headers", "credential", "method"), PRESENTED)
@pytest.mark.parametrize("access_tokens", [False, True], ids=["admin", "gateway"])
def test_a_well_formed_credential_is_presented(
    headers: Headers, credential: Presented, method: str, access_tokens: bool
) -> None:
    assert extract(*headers, access_tokens) == (credential, method)


# The forms gateway.extract.shortcut reads (the rest, with extra whitespace, fall through to extract()).
PLAIN_FORMS = {"bearer", "key-pair-headers", "basic", "bearer-lower-case", "bearer-upper-case", "basic-mixed-case"}


@pytest.mark.parametrize(("headers", "credential", "method"), PRESENTED)
def test_the_shortcut_reads_the_plain_forms_as_extract_does(
    headers: Headers, credential: Presented, method: str, request: pytest.FixtureRequest
) -> None:
    parts = shortcut(*headers)
    if request.node.callspec.id not in PLAIN_FORMS:
        assert parts is None
        return
    assert parts == (credential.kind, credential.public_id.encode(), credential.secret.encode(), method)


REFUSED = [
    pytest.param(((), (), ()), MISSING, id="none"),
    # Another scheme, or none, is not a credential of ours: answered as if nothing had been sent.
    pytest.param(authorization(b"Digest username=alice"), MISSING, id="other-scheme"),
    pytest.param(authorization(b""), MISSING, id="empty-authorization"),
    pytest.param(authorization(TOKEN), MISSING, id="token-without-scheme"),
    pytest.param(authorization(b"Bearer\t" + TOKEN), MISSING, id="tab-after-scheme"),
    # Two credentials, a repeated credential header or half a pair: 400, whatever the values.
    pytest.param(((b"Bearer " + TOKEN,), (CLIENT_ID,), (SECRET,)), TWO_CREDENTIALS, id="bearer-and-key-pair"),
    pytest.param(((b"Bearer " + TOKEN,), (CLIENT_ID,), ()), TWO_CREDENTIALS, id="bearer-and-access-key"),
    pytest.param(((basic(CLIENT_ID + b":" + SECRET),), (), (SECRET,)), TWO_CREDENTIALS, id="basic-and-secret-key"),
    pytest.param(((b"Digest x",), (CLIENT_ID,), (SECRET,)), TWO_CREDENTIALS, id="other-scheme-and-key-pair"),
    pytest.param(key_pair((CLIENT_ID,), ()), HALF_PAIR, id="access-key-only"),
    pytest.param(key_pair((), (SECRET,)), HALF_PAIR, id="secret-key-only"),
    pytest.param(authorization(b"Bearer " + TOKEN, b"Bearer " + TOKEN), REPEATED, id="authorization-twice"),
    pytest.param(key_pair((CLIENT_ID, CLIENT_ID), (SECRET,)), REPEATED, id="access-key-twice"),
    pytest.param(key_pair((CLIENT_ID,), (SECRET, SECRET)), REPEATED, id="secret-key-twice"),
    pytest.param(key_pair((), (SECRET, SECRET)), REPEATED, id="repeated-before-half-pair"),
    pytest.param(((b"Bearer " + TOKEN,) * 2, (CLIENT_ID,), ()), REPEATED, id="repeated-before-two-credentials"),
    # Values that cannot be ours: 401 without any lookup.
    pytest.param(authorization(b"Bearer " + flip_last(TOKEN)), malformed("bearer"), id="token-wrong-checksum"),
    pytest.param(authorization(b"Bearer " + TOKEN[:-1]), malformed("bearer"), id="token-too-short"),
    pytest.param(authorization(b"Bearer " + TOKEN + b"0"), malformed("bearer"), id="token-too-long"),
    pytest.param(authorization(b"Bearer " + TOKEN.upper()), malformed("bearer"), id="token-upper-cased"),
    pytest.param(authorization(b"Bearer " + TOKEN[:20] + b"-" + TOKEN[21:]), malformed("bearer"),
                 id="token-outside-alphabet"),
    pytest.param(authorization(b"Bearer " + TOKEN[:20] + b"\xc3" + TOKEN[21:]), malformed("bearer"),
                 id="token-not-ascii"),
    pytest.param(authorization(b"Bearer " + CLIENT_ID), malformed("bearer"), id="client-id-as-bearer"),
    pytest.param(authorization(b"Bearer"), malformed("bearer"), id="bearer-without-value"),
    pytest.param(authorization(b"Bearer " + TOKEN[:24] + b" " + TOKEN[24:]), malformed("bearer"),
                 id="space-inside-token"),
    pytest.param(key_pair((flip_last(CLIENT_ID),), (SECRET,)), malformed("headers"), id="client-id-wrong-checksum"),
    pytest.param(key_pair((CLIENT_ID,), (flip_last(SECRET),)), malformed("headers"), id="secret-wrong-checksum"),
    pytest.param(key_pair((SECRET,), (CLIENT_ID,)), malformed("headers"), id="halves-swapped"),
    pytest.param(key_pair((CLIENT_ID,), (TOKEN,)), malformed("headers"), id="token-as-secret"),
    pytest.param(key_pair((b"",), (b"",)), malformed("headers"), id="empty-key-pair"),
    pytest.param(authorization(basic(CLIENT_ID + SECRET)), malformed("basic"), id="basic-without-colon"),
    pytest.param(authorization(basic(CLIENT_ID + b":" + flip_last(SECRET))), malformed("basic"),
                 id="basic-wrong-checksum"),
    pytest.param(authorization(basic(b":" + SECRET)), malformed("basic"), id="basic-without-client-id"),
    pytest.param(authorization(basic(CLIENT_ID + b":" + SECRET + b":")), malformed("basic"),
                 id="basic-colon-in-secret"),
    pytest.param(authorization(basic(b"alice:password")), malformed("basic"), id="basic-user-password"),
    pytest.param(authorization(basic(TOKEN)), malformed("basic"), id="basic-token"),
    pytest.param(authorization(b"Basic " + CLIENT_ID + b":" + SECRET), malformed("basic"), id="basic-not-base64"),
    pytest.param(authorization(basic(CLIENT_ID + b":" + SECRET)[:-1]), malformed("basic"), id="basic-bad-padding"),
    pytest.param(authorization(b"Basic"), malformed("basic"), id="basic-without-value"),
    pytest.param(authorization(b"Basic " + b"A" * 516), malformed("basic"), id="basic-oversized"),
]


@pytest.mark.parametrize(("headers", "refusal"), REFUSED)
@pytest.mark.parametrize("access_tokens", [False, True], ids=["admin", "gateway"])
def test_refusals(headers: Headers, refusal: Refusal, access_tokens: bool) -> None:
    assert extract(*headers, access_tokens) == refusal


@pytest.mark.parametrize(("headers", "refusal"), REFUSED)
def test_the_shortcut_passes_on_what_extract_refuses_except_by_format(headers: Headers, refusal: Refusal) -> None:
    """Missing, repeated or conflicting credentials never reach it. A credential of the right shape but a wrong
    alphabet or checksum may: Authenticator.remembered then finds no verified digest for it (test_auth.py)."""
    parts = shortcut(*headers)
    assert parts is None or refusal.reason == "malformed"


def test_the_shortcut_leaves_access_tokens_and_legacy_keys_to_extract() -> None:
    assert shortcut((b"Bearer " + ACCESS_TOKEN,), (), ()) is None
    assert shortcut((b"Bearer " + b"x" * 48,), (), ()) is None  # a legacy token of a token's length
    assert shortcut((), (b"AKIA" + b"X" * 18,), (b"s" * 42,)) is None


@pytest.mark.parametrize(
    ("value", "access_tokens", "expected"),
    [
        pytest.param(ACCESS_TOKEN, True, (PresentedAccessToken(ACCESS_TOKEN), "oauth"), id="gateway-takes-it"),
        pytest.param(ACCESS_TOKEN, False, malformed("bearer"), id="admin-refuses-it"),
        # The shape is all extract looks at: any payload of the right alphabet and length passes.
        pytest.param(b"cga_" + b"-_" * 65, True, (PresentedAccessToken(b"cga_" + b"-_" * 65), "oauth"),
                     id="base64url-alphabet"),
        pytest.param(ACCESS_TOKEN[:30], True, malformed("bearer"), id="too-short"),
        pytest.param(ACCESS_TOKEN[:-1] + b"=", True, malformed("bearer"), id="padding-not-allowed"),
        pytest.param(ACCESS_TOKEN[:-1] + b"+", True, malformed("bearer"), id="base64-not-base64url"),
        pytest.param(b"cgx_" + ACCESS_TOKEN[4:], True, malformed("bearer"), id="wrong-prefix"),
    ],
)
def test_access_tokens_are_told_apart_by_shape(
    value: bytes, access_tokens: bool, expected: tuple[PresentedAccessToken, str] | Refusal
) -> None:
    assert extract((b"Bearer " + value,), (), (), access_tokens) == expected


def test_a_presented_credential_never_shows_its_secret() -> None:
    found = extract((b"Bearer " + ACCESS_TOKEN,), (), (), True)
    assert not isinstance(found, Refusal)
    assert repr(found[0]) == "PresentedAccessToken(...)"
    assert TOKEN.decode() not in repr(extract((b"Bearer " + TOKEN,), (), ()))
    assert SECRET.decode() not in repr(extract((), (CLIENT_ID,), (SECRET,)))
