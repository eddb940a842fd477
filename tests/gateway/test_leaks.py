"""The secret-scanning endpoint, the test playing the code host: a signed disclosure revokes a real token on every
worker of a 2-worker gateway within a second, records the URL, answers the labels by hash; a bad signature changes
nothing; a hundred reported tokens are answered in bounded time."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.core import exposure, formats
from gateway.core.settings import SettingsError, load_settings
from gateway.leaks import BadReport, ReporterKeys, parse_public_keys, parse_reports
from tests.support import Upstream, cli, running_gateway, write_config
from tests.support_faults import WORKER_HEADER, bearer, create_token, eventually, http_get, workers_answering

WORKERS = 2
PATH = "/_credgate/secret-scanning"
KEY_ID = "90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a"
URL = "https://github.com/acme/app/blob/2d1f6a0/deploy/.env"
NO_THROTTLE = "[throttle]\nmax_failures = 100000\nper_address_max_failures = 100000\nper_id_max_failures = 100000\n"
# The contract: seconds from the disclosure's answer to the token refused by every worker.
REVOKED_WITHIN = 1.0
PRODUCTION_ARGON2 = {"CREDGATE_ARGON2_MEMORY_KIB": "19456", "CREDGATE_ARGON2_TIME_COST": "2"}


class CodeHost:
    """The reporting side: its signing key, the public-keys document, and signed disclosures."""

    def __init__(self, tmp_path: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.keys_file = tmp_path / "secret-scanning-keys.json"
        pem = self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self.keys_file.write_text(json.dumps(
            {"public_keys": [{"key_identifier": KEY_ID, "key": pem, "is_current": True}]}))

    def sign(self, body: bytes, key: ec.EllipticCurvePrivateKey | None = None) -> str:
        return base64.b64encode((key or self.key).sign(body, ec.ECDSA(hashes.SHA256()))).decode()

    async def disclose(self, url: str, body: bytes, *, signature: str | None = None, key_id: str = KEY_ID,
                       limit: float = 30) -> tuple[int, Any, dict[str, str]]:
        headers = {"Content-Type": "application/json", "Github-Public-Key-Identifier": key_id,
                   "Github-Public-Key-Signature": self.sign(body) if signature is None else signature}
        timeout = aiohttp.ClientTimeout(total=limit)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                url, data=body, headers=headers) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None, dict(resp.headers)


def matches(*tokens: str) -> bytes:
    return json.dumps([{"token": t, "type": "credgate_token", "url": URL, "source": "commit"} for t in tokens]).encode()


def config(tmp_path: Path, upstream: Upstream, host: CodeHost) -> Path:
    leaks = f'[leaks]\npath = "{PATH}"\npublic_keys_file = "{host.keys_file}"\n'
    return write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}], extra=NO_THROTTLE + leaks)


async def refused_everywhere(url: str, token: str) -> float:
    """Seconds until every worker has refused the token (401); a 200 before that is still allowed."""
    refused: set[str] = set()

    async def check() -> bool:
        reply = await http_get(url, bearer(token))
        assert reply.status in (200, 401), reply.status
        if reply.status == 401:
            refused.add(reply.headers[WORKER_HEADER])
        return len(refused) >= WORKERS

    return await eventually(check, REVOKED_WITHIN + 5, "every worker refusing the revoked token", interval=0.005)


async def credential(env: dict[str, str], public_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = json.loads(await cli(env, "credentials", "show", public_id))
    return shown


async def test_a_signed_disclosure_revokes_on_every_worker(env: dict[str, str], upstream: Upstream,
                                                           tmp_path: Path) -> None:
    host = CodeHost(tmp_path)
    leaked = await create_token(env, "svc")
    bystander = await create_token(env, "svc2")
    async with running_gateway(env, config(tmp_path, upstream, host), tmp_path, workers=WORKERS,
                               extra_env={"CREDGATE_DEBUG_WORKER_HEADER": "1"}) as gw:
        endpoint = gw.url + PATH
        await workers_answering(gw.url + "/x", leaked["token"], 200, WORKERS)
        body = matches(leaked["token"], bystander["token"][:-1] + "x", "ghp_notours")

        # unsigned, badly signed, signed by another key, unknown key id, signature of another body: all refused
        other = ec.generate_private_key(ec.SECP256R1())
        for signature, key_id in (("", KEY_ID), ("not base64!", KEY_ID), (host.sign(body, other), KEY_ID),
                                  (host.sign(body), "unknown"), (host.sign(body + b" "), KEY_ID)):
            status, answer, _ = await host.disclose(endpoint, body, signature=signature, key_id=key_id)
            assert status == 400 and answer["error"] == "invalid_signature", (status, answer)
        async with aiohttp.ClientSession() as session, session.post(endpoint, data=body) as resp:
            assert resp.status == 400  # no signature headers at all
        async with aiohttp.ClientSession() as session, session.get(endpoint) as resp:
            assert resp.status == 405
        await workers_answering(gw.url + "/x", leaked["token"], 200, WORKERS)
        assert (await credential(env, leaked["id"]))["revoked_at"] is None

        status, answer, headers = await host.disclose(endpoint, body)
        answered = time.monotonic()
        assert status == 200, answer
        await refused_everywhere(gw.url + "/x", leaked["token"])
        took = time.monotonic() - answered
        assert took < REVOKED_WITHIN, f"revoked everywhere only after {took:.2f}s"
        assert answer == [
            {"token_hash": exposure.token_hash(leaked["token"]), "token_type": "credgate_token",
             "label": "true_positive"},
            {"token_hash": exposure.token_hash(bystander["token"][:-1] + "x"), "token_type": "credgate_token",
             "label": "false_positive"},
            {"token_hash": exposure.token_hash("ghp_notours"), "token_type": "credgate_token",
             "label": "false_positive"},
        ]
        assert leaked["token"] not in json.dumps(answer) and WORKER_HEADER in headers
        shown = await credential(env, leaked["id"])
        assert shown["status_label"] == "revoked (exposed)" and shown["exposed_url"] == URL
        assert (await credential(env, bystander["id"]))["status"] == "valid"
        await workers_answering(gw.url + "/x", bystander["token"], 200, WORKERS)
        assert leaked["token"] not in gw.log()


async def test_a_hundred_reported_tokens_in_bounded_time(env: dict[str, str], upstream: Upstream,
                                                         tmp_path: Path) -> None:
    host = CodeHost(tmp_path)
    env = {**env, **PRODUCTION_ARGON2}  # the hashes, hence each verification, cost what they cost in production
    live = [await create_token(env, f"svc{n}") for n in range(3)]
    tokens = [c["token"] for c in live]
    tokens += [formats.generate_token(live[n % 3]["id"]) for n in range(60)]  # right id, wrong secret: argon2
    tokens += [formats.generate_token(formats.new_public_id()) for _ in range(37)]  # unknown ids
    assert len(tokens) == 100
    async with running_gateway(env, config(tmp_path, upstream, host), tmp_path, workers=1) as gw:
        started = time.monotonic()
        status, answer, _ = await host.disclose(gw.url + PATH, matches(*tokens), limit=30)
        elapsed = time.monotonic() - started
        assert status == 200 and elapsed < 10, (status, elapsed)
    assert [item["label"] for item in answer] == ["true_positive"] * 3 + ["false_positive"] * 97
    assert [item["token_hash"] for item in answer] == [exposure.token_hash(t) for t in tokens]


def test_public_keys_document_and_reports_parse() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    other_curve = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    document = {"public_keys": [{"key_identifier": "a", "key": pem, "is_current": True},
                                {"key_identifier": "b", "key": other_curve}, {"key_identifier": "c", "key": "junk"},
                                "junk"]}
    assert set(parse_public_keys(json.dumps(document).encode())) == {"a"}
    reports = parse_reports(matches("cgt_x"))
    assert [(r.token, r.type, r.url, r.source) for r in reports] == [("cgt_x", "credgate_token", URL, "commit")]


@pytest.mark.parametrize("body", [b"{}", b"not json", b'[{"type": "x"}]', b'[{"token": 1}]',
                                  b'[{"token": "a", "url": 2}]'])
def test_malformed_reports_are_refused(body: bytes) -> None:
    with pytest.raises(BadReport):
        parse_reports(body)


async def test_keys_from_a_url_are_cached_and_refetched_for_an_unknown_id_at_most_once_a_minute() -> None:
    served: dict[str, Any] = {"public_keys": []}
    fetches: list[float] = []

    async def keys(request: web.Request) -> web.Response:
        fetches.append(time.monotonic())
        return web.json_response(served)

    def pem_of(key: ec.EllipticCurvePrivateKey) -> str:
        return key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    app = web.Application()
    app.router.add_get("/keys", keys)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        served["public_keys"] = [{"key_identifier": "k1", "key": pem_of(first), "is_current": True}]
        cache = ReporterKeys("", f"http://127.0.0.1:{port}/keys")
        assert await cache.key("k1") is not None and len(fetches) == 1
        assert await cache.key("k1") is not None and len(fetches) == 1  # cached
        assert await cache.key("forged") is None and len(fetches) == 1  # loaded just now: no refetch
        served["public_keys"].append({"key_identifier": "k2", "key": pem_of(second), "is_current": True})
        assert await cache.key("k2") is None and len(fetches) == 1  # within the minute: still not refetched
        assert cache.loaded_at is not None
        cache.loaded_at -= 61  # a minute later
        assert await cache.key("k2") is not None and len(fetches) == 2
        assert await cache.key("forged") is None and len(fetches) == 2
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("leaks", "problem"), [
    ('path = "leaks"\npublic_keys_file = "k.json"', "leaks.path: a path starting with"),
    ('path = "/"\npublic_keys_file = "k.json"', "leaks.path: a path starting with"),
    ('path = "/_credgate/leaks"', "leaks.path: set leaks.public_keys_file or leaks.public_keys_url"),
    ('path = "/_credgate/leaks"\npublic_keys_url = "ftp://x/keys"', "leaks.public_keys_url: an https:// URL"),
])
def test_leak_settings_are_validated(env: dict[str, str], tmp_path: Path, leaks: str, problem: str) -> None:
    path = tmp_path / "leaks.toml"
    path.write_text(f"[leaks]\n{leaks}\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path, env=env)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems
    path.write_text('[leaks]\npath = "/_credgate/leaks"\npublic_keys_file = "k.json"\n')
    assert load_settings(path, env=env).leaks.path == "/_credgate/leaks"


async def test_the_owner_is_told_through_the_webhook(env: dict[str, str], upstream: Upstream, tmp_path: Path) -> None:
    """End to end: the code host's disclosure at the gateway becomes a signed credential.exposed webhook,
    delivered by the admin service from the outbox the revocation wrote in its own transaction."""
    from tests.admin.test_server import running_admin
    from tests.admin.webhook_receiver import Receiver

    secret = "whsec-" + "e" * 32
    receiver = await Receiver(secret).start()
    host = CodeHost(tmp_path)
    leaked = await create_token(env, "svc")
    hooks = {"CREDGATE_WEBHOOKS_URLS": receiver.url, "CREDGATE_WEBHOOKS_SECRET": secret,
             "CREDGATE_WEBHOOKS_TIMEOUT": "1"}
    (tmp_path / "admin").mkdir()
    try:
        async with running_gateway(env, config(tmp_path, upstream, host), tmp_path) as gw, \
                running_admin({**env, **hooks}, tmp_path / "admin"):
            status, answer, _ = await host.disclose(gw.url + PATH, matches(leaked["token"]))
            assert status == 200 and answer[0]["label"] == "true_positive"

            async def exposed() -> bool:
                return any(e["type"] == "credential.exposed" for e in receiver.accepted)

            await eventually(exposed, 15, "the credential.exposed webhook")
    finally:
        await receiver.stop()
    event = next(e for e in receiver.accepted if e["type"] == "credential.exposed")
    assert event["data"]["credential"]["id"] == leaked["id"] and event["data"]["url"] == URL
    assert leaked["token"] not in json.dumps(receiver.accepted) and receiver.bad_signatures == 0
