"""The secret-scanning partner endpoint: a code host (GitHub's format) reports leaked strings, credgate revokes
the live credentials among them at once (gateway.core.exposure) and answers each string's label.

The request is a JSON array of `{token, type, url, source}`, signed with ECDSA P-256 / SHA-256 over the raw body:
the key id in `Github-Public-Key-Identifier`, the base64 DER signature in `Github-Public-Key-Signature`. The
public keys come from `leaks.public_keys_file` and/or `leaks.public_keys_url` (the host's JSON), cached; an
unknown key id reloads them, at most once a minute. An unsigned or badly signed request gets 400 and changes
nothing. The answer is `[{token_hash, token_type, label}]`: SHA-256 hashes, never a reported string.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import time
import urllib.request
from base64 import b64decode
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.app import JSON, NO_STORE, OwnEndpoint, json_body
from gateway.core import exposure, hashing, store
from gateway.core.errors import STORE_ERRORS
from gateway.core.sections import LeakSettings
from gateway.http.exchange import Consume, Exchange, Note, Respond

__all__ = ["KEY_ID_HEADER", "SIGNATURE_HEADER", "LeakEndpoint", "ReporterKeys", "parse_public_keys", "parse_reports"]

logger = logging.getLogger(__name__)

KEY_ID_HEADER: Final = b"github-public-key-identifier"
SIGNATURE_HEADER: Final = b"github-public-key-signature"
# GitHub sends batches of up to a few hundred matches; each item is small (a token and a URL).
BODY_LIMIT: Final = 1024 * 1024
MAX_REPORTS: Final = 1000
# An unknown key id reloads the keys, but not more often than this: a stream of forged ids costs nothing.
RELOAD_SECONDS: Final = 60.0
_FETCH_TIMEOUT: Final = 10.0
_KEYS_LIMIT: Final = 1024 * 1024
_ECDSA: Final = ec.ECDSA(hashes.SHA256())


class BadReport(Exception):
    """The request is refused with 400 (the message is safe to send: it never quotes the body)."""


def parse_public_keys(document: bytes) -> dict[str, ec.EllipticCurvePublicKey]:
    """The P-256 keys of a `{"public_keys": [{key_identifier, key}]}` document by id; others are skipped."""
    raw = json.loads(document)
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    entries = raw.get("public_keys") if isinstance(raw, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        key_id, pem = entry.get("key_identifier"), entry.get("key")
        if not isinstance(key_id, str) or not isinstance(pem, str):
            continue
        try:
            key = load_pem_public_key(pem.encode("ascii"))
        except (ValueError, TypeError, UnicodeError):
            continue
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            keys[key_id] = key
    return keys


def parse_reports(body: bytes) -> list[exposure.Report]:
    """The reported matches of a (verified) body; BadReport when it is not the partner format."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeError):
        raise BadReport("the body is not JSON") from None
    if not isinstance(raw, list):
        raise BadReport("a JSON array of matches expected")
    if len(raw) > MAX_REPORTS:
        raise BadReport(f"at most {MAX_REPORTS} matches per request")
    reports: list[exposure.Report] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("token"), str):
            raise BadReport("each match needs a string token")
        fields = [item.get(name, "") for name in ("type", "url", "source")]
        if not all(isinstance(value, str) for value in fields):
            raise BadReport("type, url and source must be strings")
        reports.append(exposure.Report(item["token"], *fields))
    return reports


def _read_url(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "credgate"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=_FETCH_TIMEOUT) as response:  # noqa: S310 (an operator's URL)
        data: bytes = response.read(_KEYS_LIMIT + 1)
    if len(data) > _KEYS_LIMIT:
        raise ValueError("the public keys document is too large")
    return data


class ReporterKeys:
    """The code host's signing keys from a file and/or a URL, cached; reloaded for an unknown id (rate-bound)."""

    def __init__(self, file: str, url: str, *, reload_seconds: float = RELOAD_SECONDS) -> None:
        self.file = file
        self.url = url
        self.reload_seconds = reload_seconds
        self.keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self.loaded_at: float | None = None
        self._lock = asyncio.Lock()

    async def key(self, key_id: str) -> ec.EllipticCurvePublicKey | None:
        """The key with this id; an unknown id reloads the keys when the last load is old enough."""
        key = self.keys.get(key_id)
        if key is not None:
            return key
        async with self._lock:  # concurrent requests with a new id share one reload
            if key_id not in self.keys and self._may_reload():
                await self.reload()
        return self.keys.get(key_id)

    def _may_reload(self) -> bool:
        return self.loaded_at is None or time.monotonic() - self.loaded_at >= self.reload_seconds

    async def reload(self) -> None:
        """Read every configured source; a source that fails keeps its previously loaded keys out of doubt."""
        self.loaded_at = time.monotonic()
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        sources: list[tuple[str, Callable[[], bytes]]] = []
        if self.file:
            sources.append(("leaks.public_keys_file", Path(self.file).read_bytes))
        if self.url:
            sources.append(("leaks.public_keys_url", lambda: _read_url(self.url)))
        failed = False
        for name, read in sources:
            try:
                keys.update(parse_public_keys(await asyncio.to_thread(read)))
            except (OSError, ValueError) as exc:  # json and urllib errors are ValueError/OSError subclasses
                failed = True
                logger.warning("cannot load the secret-scanning public keys from %s: %s", name, exc.__class__.__name__)
        self.keys = {**self.keys, **keys} if failed else keys


class LeakEndpoint:
    """The partner endpoint; `register` adds it to the gateway's own endpoints at `leaks.path`."""

    def __init__(
        self, settings: LeakSettings, pool: store.Pool, argon2: hashing.Argon2Pool, worker_id: bytes = b""
    ) -> None:
        self.path = settings.path
        self.keys = ReporterKeys(settings.public_keys_file, settings.public_keys_url)
        self.pool = pool
        self.argon2 = argon2
        self.worker_id = worker_id

    def register(self, own: dict[bytes, OwnEndpoint]) -> None:
        own[self.path.encode("ascii")] = self.handle

    def handle(self, ex: Exchange) -> Respond | Consume:
        if ex.method != b"POST":
            answer = self.error(ex, 405, "invalid_request", "this endpoint accepts POST only")
            answer.headers.append((b"Allow", b"POST"))
            return answer
        key_ids = [value for name, value in ex.headers if name.lower() == KEY_ID_HEADER]
        signatures = [value for name, value in ex.headers if name.lower() == SIGNATURE_HEADER]
        if len(key_ids) != 1 or len(signatures) != 1:
            return self.error(ex, 400, "invalid_signature", "one signature and one key identifier are required")
        key_id = key_ids[0].decode("latin-1").strip()
        signature = signatures[0].strip()
        return Consume(BODY_LIMIT, lambda body: self._answer(ex, key_id, signature, body))

    async def _answer(self, ex: Exchange, key_id: str, signature: bytes, body: bytes) -> Respond:
        if not await self._signed(key_id, signature, body):
            return self.error(ex, 400, "invalid_signature", "the signature does not verify")
        try:
            reports = parse_reports(body)
        except BadReport as exc:
            return self.error(ex, 400, "invalid_request", str(exc))
        note = _note(ex)
        actor = store.Actor(label="secret-scanning", auth_method="signature",
                            request_id=note.request_id.decode("latin-1"), source=ex.client_ip)
        try:
            findings = await exposure.handle_reports(self.pool, self.argon2.verify, reports, actor,
                                                     concurrency=self.argon2.concurrency)
        except STORE_ERRORS:
            return self.error(ex, 503, "temporarily_unavailable", "the credential store is unavailable", retry=True)
        except hashing.Argon2Busy:
            return self.error(ex, 503, "temporarily_unavailable", "verification capacity exhausted", retry=True)
        revoked = sum(1 for f in findings if f.revoked)
        if revoked:
            logger.warning("secret scanning: %d credential(s) revoked as exposed (key id %s)", revoked, key_id[:64])
        note.outcome = "ok"
        answer: list[dict[str, Any]] = [finding.answer() for finding in findings]
        return self.respond(ex, 200, json.dumps(answer, separators=(",", ":")).encode())

    async def _signed(self, key_id: str, signature: bytes, body: bytes) -> bool:
        if not key_id or len(key_id) > 256 or len(signature) > 1024:
            return False
        key = await self.keys.key(key_id)
        if key is None:
            return False
        try:
            key.verify(b64decode(signature, validate=True), body, _ECDSA)
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True

    def respond(self, ex: Exchange, status: int, body: bytes) -> Respond:
        headers = [JSON, NO_STORE, (b"X-Request-Id", _note(ex).request_id)]
        if self.worker_id:
            headers.append((b"X-Credgate-Worker", self.worker_id))
        return Respond(status, headers, body)

    def error(self, ex: Exchange, status: int, error: str, description: str, *, retry: bool = False) -> Respond:
        note = _note(ex)
        note.reason = error
        note.outcome = "unavailable" if status == 503 else "bad_request"
        answer = self.respond(ex, status, json_body(error, description))
        if retry:
            answer.headers.append((b"Retry-After", b"5"))
        return answer


def _note(ex: Exchange) -> Note:
    note = ex.note
    if note is None:
        note = ex.note = Note(b"-", b"-")
    return note
