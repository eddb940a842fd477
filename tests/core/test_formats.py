"""Tests for gateway.core.formats: formats, checksums and parser robustness."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.formats import (
    ALPHABET,
    CLIENT_ID_LENGTH,
    KEY_SECRET_LENGTH,
    TOKEN_LENGTH,
    Presented,
    client_id_for,
    generate_key_secret,
    generate_token,
    is_public_id,
    new_public_id,
    parse_client_id,
    parse_key_pair,
    parse_key_secret,
    parse_token,
)

Parser = Callable[[object], object]
PARSERS: dict[str, Parser] = {
    "token": parse_token,
    "client_id": parse_client_id,
    "key_secret": parse_key_secret,
    "key_pair_client": lambda value: parse_key_pair(value, generate_key_secret()),
    "key_pair_secret": lambda value: parse_key_pair(client_id_for(new_public_id()), value),
}


def _base62_decode(text: str) -> int:
    value = 0
    for char in text:
        value = value * 62 + ALPHABET.index(char)
    return value


def _samples() -> dict[str, str]:
    return {
        "token": generate_token(new_public_id()),
        "client_id": client_id_for(new_public_id()),
        "key_secret": generate_key_secret(),
    }


SAMPLE_PARSERS: dict[str, Parser] = {
    "token": parse_token,
    "client_id": parse_client_id,
    "key_secret": parse_key_secret,
}


# --- formats and round trips -------------------------------------------------------------


def test_public_id_shape() -> None:
    public_id = new_public_id()
    assert len(public_id) == 12
    assert set(public_id) <= set(ALPHABET)
    assert is_public_id(public_id)


def test_token_shape_and_round_trip() -> None:
    public_id = new_public_id()
    token = generate_token(public_id)
    assert len(token) == TOKEN_LENGTH == 48
    assert token.startswith("cgt_" + public_id)
    assert set(token[4:]) <= set(ALPHABET)

    presented = parse_token(token)
    assert presented == Presented("token", public_id, token)
    assert parse_token(token.encode("ascii")) == presented


def test_token_checksum_is_crc32_of_first_42_chars() -> None:
    token = generate_token(new_public_id())
    assert _base62_decode(token[42:]) == zlib.crc32(token[:42].encode("ascii"))


def test_client_id_shape_and_round_trip() -> None:
    public_id = new_public_id()
    client_id = client_id_for(public_id)
    assert len(client_id) == CLIENT_ID_LENGTH == 22
    assert client_id.startswith("cgk_" + public_id)
    assert _base62_decode(client_id[16:]) == zlib.crc32(client_id[:16].encode("ascii"))
    assert parse_client_id(client_id) == public_id
    assert parse_client_id(client_id.encode("ascii")) == public_id
    # Deterministic: the same public id always gives the same client id (rotation keeps it).
    assert client_id_for(public_id) == client_id


def test_key_secret_shape_and_round_trip() -> None:
    secret = generate_key_secret()
    assert len(secret) == KEY_SECRET_LENGTH == 42
    assert secret.startswith("cgs_")
    assert _base62_decode(secret[36:]) == zlib.crc32(secret[:36].encode("ascii"))
    assert parse_key_secret(secret) == secret
    assert parse_key_secret(secret.encode("ascii")) == secret


def test_key_pair_round_trip() -> None:
    public_id = new_public_id()
    client_id = client_id_for(public_id)
    secret = generate_key_secret()
    assert parse_key_pair(client_id, secret) == Presented("key", public_id, secret)
    assert parse_key_pair(client_id.encode(), secret.encode()) == Presented("key", public_id, secret)


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [
        ("cgk_bad", generate_key_secret()),
        (client_id_for(new_public_id()), "cgs_bad"),
        (generate_key_secret(), client_id_for(new_public_id())),  # swapped halves
        (None, None),
    ],
)
def test_key_pair_needs_both_halves_well_formed(client_id: object, secret: object) -> None:
    assert parse_key_pair(client_id, secret) is None


def test_checksum_is_zero_padded_to_six_chars() -> None:
    # About one public id in five has a CRC32 below 62**5, whose base62 form needs a leading zero.
    while True:
        public_id = new_public_id()
        if zlib.crc32(("cgk_" + public_id).encode("ascii")) < 62**5:
            break
    client_id = client_id_for(public_id)
    assert len(client_id) == CLIENT_ID_LENGTH
    assert client_id[16] == "0"
    assert parse_client_id(client_id) == public_id


def test_kinds_are_not_interchangeable() -> None:
    token = generate_token(new_public_id())
    client_id = client_id_for(new_public_id())
    secret = generate_key_secret()
    assert parse_client_id(token) is None
    assert parse_key_secret(token) is None
    assert parse_token(secret) is None
    assert parse_token(client_id) is None
    assert parse_key_secret(client_id) is None
    # Right length and valid checksum, wrong prefix: recompute nothing, just swap the prefix.
    assert parse_token("cgs_" + token[4:]) is None


@pytest.mark.parametrize(
    "bad_public_id", ["", "short", "x" * 13, "abc_def-ghij", "ÄbcdefghijkL", "abcdefghijk "]
)
def test_generators_reject_bad_public_ids(bad_public_id: str) -> None:
    assert not is_public_id(bad_public_id)
    with pytest.raises(ValueError):
        generate_token(bad_public_id)
    with pytest.raises(ValueError):
        client_id_for(bad_public_id)


@pytest.mark.parametrize(
    "value", [None, 12, b"abcdefghijkl", "abcdefghijk", "abcdefghijklm", "abcdefghijk\n"]
)
def test_is_public_id_rejects(value: object) -> None:
    assert not is_public_id(value)


# --- every single-character change is caught ------------------------------------------------


def _replacements(char: str) -> set[str]:
    """Several different characters: a case flip, neighbours in the alphabet, and non-alphabet ones."""
    candidates = {char.swapcase(), "0", "z", "A", "_", "-", " ", "é"}
    if char in ALPHABET:
        index = ALPHABET.index(char)
        candidates |= {ALPHABET[(index + 1) % 62], ALPHABET[(index - 1) % 62], ALPHABET[(index + 31) % 62]}
    candidates.discard(char)
    return candidates


@pytest.mark.parametrize("kind", sorted(SAMPLE_PARSERS))
def test_every_single_character_substitution_is_rejected(kind: str) -> None:
    parser = SAMPLE_PARSERS[kind]
    for _ in range(5):
        original = _samples()[kind]
        assert parser(original) is not None
        for position, char in enumerate(original):
            for replacement in _replacements(char):
                altered = original[:position] + replacement + original[position + 1 :]
                assert parser(altered) is None, (kind, position, replacement)
                if replacement.isascii():
                    assert parser(altered.encode("ascii")) is None, (kind, position, replacement)


@pytest.mark.parametrize("kind", sorted(SAMPLE_PARSERS))
def test_adjacent_transpositions_and_truncations_are_rejected(kind: str) -> None:
    parser = SAMPLE_PARSERS[kind]
    original = _samples()[kind]
    for position in range(len(original) - 1):
        swapped = original[:position] + original[position + 1] + original[position] + original[position + 2 :]
        if swapped != original:
            assert parser(swapped) is None, (kind, position)
    for cut in range(len(original)):
        assert parser(original[:cut]) is None
    assert parser(original + "0") is None
    assert parser(" " + original) is None
    assert parser(original + "\n") is None


# --- garbage never raises ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PARSERS))
@given(value=st.text())
@settings(max_examples=200, deadline=None)
def test_parsers_return_none_for_random_text(name: str, value: str) -> None:
    assert PARSERS[name](value) is None


@pytest.mark.parametrize("name", sorted(PARSERS))
@given(value=st.binary())
@settings(max_examples=200, deadline=None)
def test_parsers_return_none_for_random_bytes(name: str, value: bytes) -> None:
    assert PARSERS[name](value) is None


@pytest.mark.parametrize("name", sorted(PARSERS))
@given(
    value=st.one_of(
        st.text(alphabet=ALPHABET + "_", min_size=20, max_size=50),
        st.binary(min_size=20, max_size=50),
        st.builds(lambda tail: "cgt_" + tail, st.text(min_size=44, max_size=44)),
        st.builds(lambda tail: "cgk_" + tail, st.text(alphabet=ALPHABET, min_size=18, max_size=18)),
        st.builds(lambda tail: "cgs_" + tail, st.text(alphabet=ALPHABET, min_size=38, max_size=38)),
        st.builds(lambda tail: b"cgt_" + tail, st.binary(min_size=44, max_size=44)),
    )
)
@settings(max_examples=200, deadline=None)
def test_parsers_return_none_for_near_misses(name: str, value: str | bytes) -> None:
    # The odds that random characters carry a valid CRC32 are 1 in 2**32.
    assert PARSERS[name](value) is None


@pytest.mark.parametrize("name", sorted(PARSERS))
@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        b"",
        0,
        48,
        1.5,
        [],
        {},
        object(),
        bytearray(b"cgt_"),
        "x" * 10_000_000,
        b"x" * 10_000_000,
        "cgt_" + "é" * 44,
        "cgt_" + "\u0661" * 44,  # Arabic-Indic digits: str.isalnum() is True for these
        "cgt_" + "\U0001f600" * 44,
        ("\udcff" * 48),  # lone surrogate: cannot even be encoded
        b"\xff" * 48,
        "\x00" * 48,
        " " * 48,
        "\t\r\n" * 16,
    ],
    ids=lambda value: repr(value)[:24],
)
def test_parsers_return_none_for_garbage(name: str, value: object) -> None:
    assert PARSERS[name](value) is None


@pytest.mark.parametrize("kind", sorted(SAMPLE_PARSERS))
@pytest.mark.parametrize("pad", [" ", "\t", "\n", "\r\n", "\x00", "\u00a0"])
def test_whitespace_padding_is_rejected(kind: str, pad: str) -> None:
    original = _samples()[kind]
    parser = SAMPLE_PARSERS[kind]
    for padded in (pad + original, original + pad, pad + original + pad):
        assert parser(padded) is None
        assert parser(padded.encode("utf-8")) is None


@pytest.mark.parametrize("kind", sorted(SAMPLE_PARSERS))
def test_non_ascii_lookalike_of_right_length_is_rejected(kind: str) -> None:
    original = _samples()[kind]
    # Full-width digit/letter lookalikes keep the length but are not ASCII.
    lookalike = original[:-1] + chr(ord(original[-1]) + 0xFEE0)
    assert len(lookalike) == len(original)
    assert SAMPLE_PARSERS[kind](lookalike) is None


# --- randomness and secrecy ---------------------------------------------------------------------


def test_generated_values_differ_across_calls() -> None:
    public_id = new_public_id()
    tokens = {generate_token(public_id) for _ in range(1000)}
    secrets_ = {generate_key_secret() for _ in range(1000)}
    ids = {new_public_id() for _ in range(1000)}
    assert len(tokens) == len(secrets_) == len(ids) == 1000


def test_repr_hides_the_secret() -> None:
    public_id = new_public_id()
    token = generate_token(public_id)
    presented = parse_token(token)
    assert presented is not None
    shown = repr(presented)
    assert shown == f"Presented(kind='token', public_id='{public_id}')"
    assert token not in shown
    assert token[16:42] not in shown
    assert token not in str(presented)
    assert token not in f"{presented}"

    secret = generate_key_secret()
    pair = parse_key_pair(client_id_for(public_id), secret)
    assert pair is not None
    assert secret not in repr(pair)
    assert secret[4:36] not in str(pair)


def test_presented_is_frozen() -> None:
    presented = parse_token(generate_token(new_public_id()))
    assert presented is not None
    with pytest.raises(AttributeError):
        presented.secret = "other"  # type: ignore[misc]
