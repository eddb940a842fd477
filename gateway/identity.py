"""Signed identity: `Credgate-Identity`, a compact JWS (EdDSA over Ed25519) upstreams verify with the JWKS.

The gateway proves to an upstream that only it could have set the identity: the upstream fetches
`/.well-known/jwks.json` once, then checks each request's assertion with any JWT library (see the README).
Keys come from PEM files (`identity.key_files`): the first signs, every one is published, so a new key is
added first and the old one dropped from the list once no assertion it signed can still be valid. Each
assertion is reused for CACHE_SECONDS per (credential, route, method): Ed25519 does not run per request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.core.settings import Settings
from gateway.entry import CachedCredential

HEADER = "Credgate-Identity"
JWKS_PATH = "/.well-known/jwks.json"
CACHE_SECONDS = 1.0
MAX_CACHED = 10_000


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    """The RFC 7638 JWK thumbprint: the same key always has the same id, wherever it is loaded."""
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": b64url(_raw(public))}, separators=(",", ":"))
    return b64url(hashlib.sha256(canonical.encode()).digest())


def load_key(path: str) -> Ed25519PrivateKey | Ed25519PublicKey:
    """An Ed25519 private or public key from a PEM file; ValueError naming the file otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror})") from None
    key: Any
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise ValueError(f"{path}: not an unencrypted PEM key; make one with `credgate keys generate`") from None
    if not isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        raise ValueError(f"{path}: an Ed25519 key is required, this is {type(key).__name__}")
    return key


def generate(path: Path) -> str:
    """Write a new Ed25519 private key (PEM, mode 0600) and its public key beside it (.pub); return its id."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never over an existing key
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public = private.public_key()
    path.with_name(path.name + ".pub").write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(public)


class IdentitySigner:
    def __init__(self, keys: list[Ed25519PrivateKey | Ed25519PublicKey], issuer: str, ttl: int) -> None:
        signing = keys[0]
        if not isinstance(signing, Ed25519PrivateKey):
            raise ValueError("the first identity key must be a private key: it signs")
        self.key = signing
        self.issuer = issuer
        self.ttl = ttl
        publics = [k.public_key() if isinstance(k, Ed25519PrivateKey) else k for k in keys]
        self.kid = key_id(publics[0])
        header = {"alg": "EdDSA", "typ": "JWT", "kid": self.kid}
        self._header = b64url(json.dumps(header, separators=(",", ":")).encode())
        self.jwks = json.dumps({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": b64url(_raw(p)), "kid": key_id(p), "alg": "EdDSA", "use": "sig"}
            for p in publics]}, separators=(",", ":")).encode()
        self._cache: dict[tuple[str, int, str, str], tuple[float, bytes]] = {}

    @classmethod
    def from_settings(cls, s: Settings) -> IdentitySigner | None:
        """None when no key is configured (the settings refuse assertions without one)."""
        if not s.identity.key_files:
            return None
        keys = [load_key(path) for path in s.identity.key_files]
        return cls(keys, s.identity.issuer or f"http://{s.gateway.listen}", s.identity.ttl)

    def header_line(self, entry: CachedCredential, route: str, method: str, groups: frozenset[str]) -> bytes:
        """`Credgate-Identity: <JWS>\\r\\n` for this caller on this route, signed at most once a second."""
        now = time.monotonic()
        key = (entry.public_id, entry.seq, route, method)
        cached = self._cache.get(key)
        if cached is not None and now < cached[0]:
            return cached[1]
        issued = int(time.time())
        claims = {
            "iss": self.issuer, "sub": str(entry.owner_id), "name": entry.owner_name, "groups": sorted(groups),
            "cred": entry.public_id, "amr": [method], "aud": route, "iat": issued, "exp": issued + self.ttl,
            "jti": b64url(secrets.token_bytes(12)),
        }
        signing_input = self._header + "." + b64url(json.dumps(claims, separators=(",", ":")).encode())
        token = signing_input + "." + b64url(self.key.sign(signing_input.encode("ascii")))
        line = HEADER.encode() + b": " + token.encode("ascii") + b"\r\n"
        if len(self._cache) >= MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if now < v[0]}
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
        self._cache[key] = (now + CACHE_SECONDS, line)
        return line
