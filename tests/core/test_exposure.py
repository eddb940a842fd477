"""gateway.core.exposure: classifying reported strings, revoking live credentials as exposed with their audit
event, and the published scanner patterns matching exactly credgate's formats."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.core import exposure, formats, hashing, store
from gateway.core.exposure import Report

FAST = hashing.Argon2Params(memory_kib=1024, time_cost=1)
PATTERNS = Path(__file__).resolve().parents[2] / "deploy" / "secret-scanning-patterns.json"
ACTOR = store.Actor(label="test", source="test")
URL = "https://github.com/acme/app/blob/abc/.env"


class Credentials:
    """Real credentials in this test's database, hashed like the admin service does."""

    def __init__(self, pool: Any, argon2: hashing.Argon2Pool) -> None:
        self.pool = pool
        self.argon2 = argon2
        self.owner_id = 0

    async def owner(self) -> int:
        if not self.owner_id:
            self.owner_id = await self.pool.fetchval(
                "INSERT INTO principals (name, kind) VALUES ('svc', 'service') RETURNING id")
        return self.owner_id

    async def insert(self, public_id: str, kind: str, secret: str) -> None:
        await self.pool.execute(store.INSERT_CREDENTIAL, public_id, kind, await self.argon2.hash(secret), "",
                                await self.owner(), None, "cli:test", None, None, None)

    async def token(self) -> tuple[str, str]:
        public_id = formats.new_public_id()
        token = formats.generate_token(public_id)
        await self.insert(public_id, "token", token)
        return public_id, token

    async def key(self) -> tuple[str, str, str]:
        public_id = formats.new_public_id()
        secret = formats.generate_key_secret()
        await self.insert(public_id, "key", secret)
        return public_id, formats.client_id_for(public_id), secret

    async def row(self, public_id: str) -> Any:
        return await self.pool.fetchrow(store.CREDENTIAL_BY_PUBLIC_ID, public_id)


@pytest.fixture
async def creds(pool: Any) -> Any:
    argon2 = hashing.Argon2Pool(hashing.make_hasher(FAST), concurrency=4, queue_limit=1000)
    try:
        yield Credentials(pool, argon2)
    finally:
        argon2.close()


async def handle(creds: Credentials, reports: list[Report]) -> list[exposure.Finding]:
    return await exposure.handle_reports(creds.pool, creds.argon2.verify, reports, ACTOR, concurrency=4)


async def exposed_events(pool: Any, public_id: str) -> list[Any]:
    return list(await pool.fetch(
        "SELECT actor, changes FROM audit_events WHERE action = 'credential.exposed' AND target = $1", public_id))


def test_candidates_parse_only_credgate_formats() -> None:
    public_id = formats.new_public_id()
    token = formats.generate_token(public_id)
    secret = formats.generate_key_secret()
    client_id = formats.client_id_for(public_id)
    assert [(p.kind, p.public_id) for p in exposure.candidates(token)] == [("token", public_id)]
    assert [(p.kind, p.public_id) for p in exposure.candidates(f"{client_id}:{secret}")] == [("key", public_id)]
    assert [p.public_id for p in exposure.candidates(secret, [public_id, public_id])] == [public_id]
    assert exposure.candidates(secret) == []  # a bare secret names no credential
    assert exposure.candidates(client_id) == []  # a client id is public
    assert exposure.candidates(token[:-1] + ("A" if token[-1] != "A" else "B")) == []  # checksum
    assert exposure.candidates("ghp_" + "a" * 36) == []
    assert "cgt_" not in repr(Report(token, "t", URL, "s"))


async def test_a_live_token_is_revoked_as_exposed_with_its_audit_event(creds: Credentials) -> None:
    public_id, token = await creds.token()
    [finding] = await handle(creds, [Report(token, "credgate_token", URL, "commit")])
    assert finding.label == "true_positive" and finding.revoked and finding.public_id == public_id
    assert finding.answer() == {"token_hash": exposure.token_hash(token), "token_type": "credgate_token",
                                "label": "true_positive"}
    assert token not in json.dumps(finding.answer())
    row = await creds.row(public_id)
    assert row["revoked_at"] is not None
    assert (row["revoked_reason"], row["exposed_url"]) == ("exposed", URL)
    fields = exposure.credential_fields(row, row["revoked_at"])
    assert fields == {"revocation_reason": "exposed", "exposed_url": URL, "status_label": "revoked (exposed)"}
    [event] = await exposed_events(creds.pool, public_id)
    assert event["actor"] == "test"
    changes = event["changes"]
    assert (json.loads(changes) if isinstance(changes, str) else changes) == {"url": URL, "source": "commit"}
    # reported again: still a true positive, but nothing more is written
    [again] = await handle(creds, [Report(token, "credgate_token", URL + "2", "commit")])
    assert again.label == "true_positive" and not again.revoked
    assert (await creds.row(public_id))["exposed_url"] == URL
    assert len(await exposed_events(creds.pool, public_id)) == 1


async def test_key_pairs_and_bare_secrets_paired_by_url(creds: Credentials) -> None:
    first, first_client, first_secret = await creds.key()
    second, second_client, second_secret = await creds.key()
    findings = await handle(creds, [
        Report(f"{first_client}:{first_secret}", "credgate_key_pair", URL, "commit"),
        Report(second_client, "credgate_client_id", "https://x.test/b", "commit"),
        Report(second_secret, "credgate_key_secret", "https://x.test/b", "commit"),
    ])
    assert [f.label for f in findings] == ["true_positive", "false_positive", "true_positive"]
    assert [f.public_id for f in findings] == [first, None, second]
    assert (await creds.row(second))["revoked_reason"] == "exposed"


async def test_false_positives_change_nothing(creds: Credentials) -> None:
    public_id, _token = await creds.token()
    key_id, client_id, secret = await creds.key()
    wrong_secret = formats.generate_token(public_id)  # well-formed, right id, wrong secret
    reports = [
        Report(wrong_secret, "credgate_token", URL, "commit"),
        Report(formats.generate_token(formats.new_public_id()), "credgate_token", URL, "commit"),  # unknown id
        Report(secret, "credgate_key_secret", "https://elsewhere.test/", "commit"),  # no client id at its URL
        Report(f"{client_id}:{formats.generate_key_secret()}", "credgate_key_pair", URL, "commit"),
        Report("not a credential", "other", URL, "commit"),
        # a token's string presented as a key-pair secret does not verify across kinds
        Report(f"{formats.client_id_for(public_id)}:{formats.generate_key_secret()}", "credgate_key_pair", URL, ""),
    ]
    findings = await handle(creds, reports)
    assert [f.label for f in findings] == ["false_positive"] * len(reports)
    assert [f.token_hash for f in findings] == [exposure.token_hash(r.token) for r in reports]
    for credential in (public_id, key_id):
        assert (await creds.row(credential))["revoked_at"] is None
    assert await creds.pool.fetchval("SELECT count(*) FROM audit_events WHERE action = 'credential.exposed'") == 0


async def test_a_rotated_out_secret_in_its_grace_period_is_a_leak(creds: Credentials) -> None:
    public_id, old = await creds.token()
    new = formats.generate_token(public_id)
    grace = await creds.pool.fetchval(store.NOW_PLUS_SECONDS, 3600)
    await creds.pool.execute(store.ROTATE_CREDENTIAL, public_id, await creds.argon2.hash(new), grace)
    [finding] = await handle(creds, [Report(old, "credgate_token", URL, "commit")])
    assert finding.label == "true_positive" and finding.revoked


async def test_a_hundred_reports_finish_in_bounded_time(creds: Credentials) -> None:
    live = [await creds.token() for _ in range(10)]
    reports = [Report(token, "credgate_token", URL, "commit") for _, token in live]
    reports += [Report(formats.generate_token(public_id), "credgate_token", URL, "commit")
                for public_id, _ in live for _ in range(9)]  # wrong secrets: argon2 runs for each
    assert len(reports) == 100
    started = time.monotonic()
    findings = await asyncio.wait_for(handle(creds, reports), 30)
    assert time.monotonic() - started < 10
    assert sum(f.label == "true_positive" for f in findings) == 10
    assert creds.argon2.in_flight == 0


def _patterns() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(PATTERNS.read_text())
    return {p["name"]: p for p in document["patterns"]}


def test_published_patterns_match_fresh_credentials_and_nothing_else() -> None:
    patterns = {name: re.compile(p["regex"]) for name, p in _patterns().items()}
    assert set(patterns) == {"credgate_token", "credgate_key_pair", "credgate_key_secret", "credgate_client_id"}
    for _ in range(50):
        public_id = formats.new_public_id()
        token, secret = formats.generate_token(public_id), formats.generate_key_secret()
        client_id = formats.client_id_for(public_id)
        samples = {"credgate_token": token, "credgate_key_secret": secret, "credgate_client_id": client_id,
                   "credgate_key_pair": f"{client_id}:{secret}"}
        for name, sample in samples.items():
            found = patterns[name].findall(f'API_KEY="{sample}"\n')
            assert found == [sample], (name, found)
            assert patterns[name].fullmatch(sample)
            assert exposure.candidates(sample, [public_id]) or name == "credgate_client_id"
        for name in ("credgate_token", "credgate_key_secret", "credgate_client_id"):
            assert not patterns[name].search(samples[name] + "x")  # longer: another format
            assert not patterns[name].search(samples[name][:-1])  # shorter
            assert not patterns[name].search("x" + samples[name])  # glued to a word
    others = ["ghp_" + "A" * 36, "cgt_" + "A" * 43, "cgx_" + "A" * 44, "cgt-" + "A" * 44, "sk_live_" + "a" * 24,
              "CGT_" + "A" * 44, "cgs_" + "a" * 37, "cgk_" + "a" * 17]
    for text in others:
        assert not any(p.search(text) for p in patterns.values()), text
