"""Signed identity: the JWS verifies with PyJWT against the JWKS, expires, resists tampering, survives rotation."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.core.rate_policy import credential_limits
from gateway.entry import CachedCredential
from gateway.identity import IdentitySigner, generate, key_id, load_key


def entry(public_id: str = "abcdefghijkl", seq: int = 0) -> CachedCredential:
    return CachedCredential(
        public_id=public_id, credential_id=7, kind="key", name="ci", owner_id=42, owner_name="reporting",
        owner_disabled=False, revoked=False, expires_at=None, creator="admin", groups=frozenset({"finance", "ops"}),
        current_fp="", previous_fp="", previous_until=0.0, fetched=0.0, stored_at=0.0, seq=seq,
        limits=credential_limits(None, None),
    )


def signer_with(tmp_path: Path, *names: str, ttl: int = 60) -> IdentitySigner:
    keys = []
    for name in names:
        path = tmp_path / name
        if not path.exists():
            generate(path)
        keys.append(load_key(str(path)))
    return IdentitySigner(keys, "http://gateway.test", ttl)


def token_of(line: bytes) -> str:
    name, _, value = line.rstrip(b"\r\n").partition(b": ")
    assert name == b"Credgate-Identity"
    return value.decode()


def verify(signer: IdentitySigner, token: str, audience: str = "api") -> dict[str, object]:
    jwks = jwt.PyJWKSet.from_json(signer.jwks.decode())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    return jwt.decode(token, key=key, algorithms=["EdDSA"], audience=audience, issuer="http://gateway.test")


def test_the_assertion_verifies_with_a_standard_jwt_library(tmp_path: Path) -> None:
    signer = signer_with(tmp_path, "k1.pem")
    claims = verify(signer, token_of(signer.header_line(entry(), "api", "basic", frozenset({"finance"}))))
    assert claims["sub"] == "42" and claims["name"] == "reporting" and claims["groups"] == ["finance"]
    assert claims["cred"] == "abcdefghijkl" and claims["amr"] == ["basic"] and claims["aud"] == "api"
    assert isinstance(claims["jti"], str) and claims["exp"] == claims["iat"] + 60  # type: ignore[operator]
    header = jwt.get_unverified_header(token_of(signer.header_line(entry(), "api", "basic", frozenset())))
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": signer.kid}


def test_it_is_signed_once_a_second_per_credential_route_and_method(tmp_path: Path) -> None:
    signer = signer_with(tmp_path, "k1.pem")
    first = signer.header_line(entry(), "api", "bearer", frozenset())
    assert signer.header_line(entry(), "api", "bearer", frozenset()) is first
    assert signer.header_line(entry(), "other", "bearer", frozenset()) != first
    assert signer.header_line(entry(seq=1), "api", "bearer", frozenset()) != first  # a changed credential
    signer._cache[("abcdefghijkl", 0, "api", "bearer")] = (time.monotonic() - 1, first)  # a second later
    assert signer.header_line(entry(), "api", "bearer", frozenset()) != first


def test_it_fails_after_exp_and_for_another_audience(tmp_path: Path) -> None:
    signer = signer_with(tmp_path, "k1.pem", ttl=1)
    token = token_of(signer.header_line(entry(), "api", "bearer", frozenset()))
    with pytest.raises(jwt.InvalidAudienceError):
        verify(signer, token, audience="admin")
    time.sleep(2.1)
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(signer, token)


def test_a_tampered_payload_fails(tmp_path: Path) -> None:
    signer = signer_with(tmp_path, "k1.pem")
    head, payload, signature = token_of(signer.header_line(entry(), "api", "bearer", frozenset())).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["groups"] = ["admin"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(jwt.InvalidSignatureError):
        verify(signer, f"{head}.{forged}.{signature}")


def test_after_rotation_old_assertions_verify_while_the_old_key_is_published(tmp_path: Path) -> None:
    old = signer_with(tmp_path, "old.pem")
    before = token_of(old.header_line(entry(), "api", "bearer", frozenset()))
    rotated = signer_with(tmp_path, "new.pem", "old.pem")  # the new key first: it signs
    after = token_of(rotated.header_line(entry(), "api", "bearer", frozenset()))
    assert jwt.get_unverified_header(after)["kid"] == rotated.kid != old.kid
    assert len(json.loads(rotated.jwks)["keys"]) == 2
    assert verify(rotated, before)["sub"] == verify(rotated, after)["sub"] == "42"
    retired = signer_with(tmp_path, "new.pem")
    with pytest.raises(StopIteration):  # the old key is no longer published: nothing verifies it
        verify(retired, before)


def test_keys_files(tmp_path: Path) -> None:
    kid = generate(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    private, public = load_key(str(tmp_path / "k.pem")), load_key(str(tmp_path / "k.pem.pub"))
    assert isinstance(private, Ed25519PrivateKey) and isinstance(public, Ed25519PublicKey)
    assert key_id(public) == kid == key_id(private.public_key())
    with pytest.raises(FileExistsError):
        generate(tmp_path / "k.pem")
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ValueError, match=r"bad\.pem: not an unencrypted PEM key"):
        load_key(str(tmp_path / "bad.pem"))
    with pytest.raises(ValueError, match=r"missing\.pem: cannot be read"):
        load_key(str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="the first identity key must be a private key"):
        IdentitySigner([public], "x", 60)
