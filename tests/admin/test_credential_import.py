"""admin.credential_import against real Postgres: every problem by line (never a value), one transaction, policy."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from admin import credential_import, lifecycle
from gateway.core import legacy
from gateway.core.settings import PolicySettings, Settings
from tests.support import cli

TOKEN = "legacy-token-0123456789abcdef"
SECRET = "legacy-secret-0123456789abcdef"


async def owner(settings: Settings, pool: Any, name: str = "svc") -> None:
    await lifecycle.create_principal(pool, lifecycle.cli_actor(), lifecycle.secret_hasher(settings.argon2), name,
                                     service=True)


async def run(settings: Settings, pool: Any, text: str, file_format: credential_import.FileFormat = "jsonl",
              dry_run: bool = False) -> credential_import.ImportReport:
    return await credential_import.import_credentials(
        pool, lifecycle.cli_actor(), settings.policy, settings.argon2, settings.secret_key_bytes, text, file_format,
        dry_run=dry_run)


def jsonl(*rows: dict[str, Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


async def test_rows_are_imported_in_every_form(settings: Settings, pool: Any) -> None:
    await owner(settings, pool)
    sha = hashlib.sha256(b"sha-token-0123456789abcdef").hexdigest()
    crypt = bcrypt.hashpw(SECRET.encode(), bcrypt.gensalt(4)).decode()
    report = await run(settings, pool, jsonl(
        {"owner": "svc", "name": "plain", "kind": "token", "key": TOKEN},
        {"owner": "svc", "kind": "token", "hash": sha.upper(), "scheme": "SHA256", "expires_at": "2099-01-01"},
        {"owner": "svc", "kind": "key", "client_id": "AKIA0001", "hash": crypt, "scheme": "bcrypt"},
        {"owner": "svc", "kind": "key", "client_id": "AKIA0002", "key": SECRET, "expires_at": None},
    ))
    assert not report.problems and report.imported == 4 and report.capped == 1
    assert report.by_format == {"plaintext": 2, "sha256": 1, "bcrypt": 1}
    rows = await pool.fetch("SELECT public_id, kind, secret_hash, legacy, expires_at, created_by FROM credentials "
                            "ORDER BY id")
    assert [r["public_id"] for r in rows] == report.ids and all(r["legacy"] for r in rows)
    assert rows[0]["secret_hash"].startswith("$argon2id$") and rows[3]["secret_hash"].startswith("$argon2id$")
    assert rows[1]["secret_hash"] == f"legacy$sha256${sha}" and rows[2]["secret_hash"] == f"legacy$bcrypt${crypt}"
    now = datetime.now(UTC)
    assert rows[1]["expires_at"] <= now + timedelta(days=settings.policy.max_expiry_days)  # capped
    assert abs(rows[0]["expires_at"] - now - timedelta(days=settings.policy.default_expiry_days)) < timedelta(hours=1)
    lookups = {r["lookup"] for r in await pool.fetch("SELECT lookup FROM credential_legacy_lookup")}
    assert lookups == {legacy.token_lookup(settings.secret_key_bytes, TOKEN), f"sha256:{sha}", "k:AKIA0001",
                       "k:AKIA0002"}
    audit = await pool.fetch("SELECT target, changes FROM audit_events WHERE action = 'credential.import' ORDER BY id")
    assert [a["target"] for a in audit] == report.ids
    dump = json.dumps([dict(r) for r in rows], default=str) + json.dumps([a["changes"] for a in audit])
    assert TOKEN not in dump and SECRET not in dump  # plaintext is hashed, never stored


async def test_dry_run_names_every_bad_row_and_writes_nothing(settings: Settings, pool: Any) -> None:
    await owner(settings, pool)
    text = jsonl(
        {"owner": "svc", "kind": "token", "key": TOKEN},
        {"owner": "nobody", "kind": "token", "key": "another-token-0123456789"},  # line 2: unknown owner
        {"owner": "svc", "kind": "token", "hash": bcrypt.hashpw(b"x" * 20, bcrypt.gensalt(4)).decode(),
         "scheme": "bcrypt"},  # line 3: a salted hash cannot index a bare token
        {"owner": "svc", "kind": "key", "key": "short"},  # line 4: no client_id, key too short
        {"owner": "svc", "kind": "token", "key": "third-token-0123456789ab"},
    )
    report = await run(settings, pool, text, dry_run=True)
    assert sorted({p.line for p in report.problems}) == [2, 3, 4]
    by_line = {(p.line, p.field) for p in report.problems}
    assert {(2, "owner"), (3, "scheme"), (4, "client_id"), (4, "key")} <= by_line
    assert "salted" in next(p.message for p in report.problems if p.line == 3)
    shown = " ".join(str(p) for p in report.problems)
    assert "another-token" not in shown and "short" not in shown.replace("too short", "")
    assert await pool.fetchval("SELECT count(*) FROM credentials") == 0
    # without --dry-run the same file is refused as a whole
    report = await run(settings, pool, text)
    assert report.imported == 0 and len({p.line for p in report.problems}) == 3
    assert await pool.fetchval("SELECT count(*) FROM credentials") == 0
    assert await pool.fetchval("SELECT count(*) FROM audit_events WHERE action = 'credential.import'") == 0


async def test_duplicates_within_the_file_and_against_the_store(settings: Settings, pool: Any) -> None:
    await owner(settings, pool)
    sha = hashlib.sha256(TOKEN.encode()).hexdigest()
    text = jsonl({"owner": "svc", "kind": "token", "key": TOKEN},
                 {"owner": "svc", "kind": "token", "hash": sha, "scheme": "sha256"})  # the same token, hashed
    report = await run(settings, pool, text, dry_run=True)
    assert [str(p) for p in report.problems] == ["line 2: key: the same key as line 1"]
    assert (await run(settings, pool, jsonl({"owner": "svc", "kind": "token", "key": TOKEN}))).imported == 1
    again = await run(settings, pool, jsonl({"owner": "svc", "kind": "token", "key": TOKEN},
                                            {"owner": "svc", "kind": "key", "client_id": "AKIA1", "key": SECRET}))
    assert [str(p) for p in again.problems] == ["line 1: key: imported already"]
    assert (await run(settings, pool, jsonl({"owner": "svc", "kind": "key", "client_id": "AKIA1", "hash": sha,
                                             "scheme": "sha256"}))).imported == 1
    taken = await run(settings, pool, jsonl({"owner": "svc", "kind": "key", "client_id": "AKIA1", "key": SECRET}))
    assert [str(p) for p in taken.problems] == ["line 1: client_id: imported already"]


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        pytest.param({"kind": "token", "key": TOKEN}, "owner", "required", id="no-owner"),
        pytest.param({"owner": "svc", "kind": "bearer", "key": TOKEN}, "kind", "token or key", id="bad-kind"),
        pytest.param({"owner": "svc", "kind": "token", "key": TOKEN, "hash": "ab" * 32, "scheme": "sha256"},
                     "key", "not both", id="key-and-hash"),
        pytest.param({"owner": "svc", "kind": "token"}, "key", "plaintext key", id="no-secret"),
        pytest.param({"owner": "svc", "kind": "token", "hash": "ab" * 32}, "scheme", "one of", id="no-scheme"),
        pytest.param({"owner": "svc", "kind": "token", "hash": "ab" * 32, "scheme": "md5"}, "scheme", "one of",
                     id="unknown-scheme"),
        pytest.param({"owner": "svc", "kind": "token", "hash": "ab" * 31, "scheme": "sha256"}, "hash", "64 hex",
                     id="short-hash"),
        pytest.param({"owner": "svc", "kind": "token", "key": "cgt_" + "a" * 44}, "key", "credgate-format",
                     id="credgate-token"),
        pytest.param({"owner": "svc", "kind": "key", "client_id": "a:b", "key": SECRET}, "client_id", "':'",
                     id="colon-in-client-id"),
        pytest.param({"owner": "svc", "kind": "token", "client_id": "x", "key": TOKEN}, "client_id", "key pairs",
                     id="client-id-on-token"),
        pytest.param({"owner": "svc", "kind": "token", "key": TOKEN, "expires_at": "2001-01-01"}, "expires_at",
                     "past", id="expired"),
        pytest.param({"owner": "svc", "kind": "token", "key": TOKEN, "expires_at": "soon"}, "expires_at",
                     "ISO 8601", id="bad-expiry"),
        pytest.param({"owner": "svc", "kind": "token", "key": TOKEN, "secret": "x"}, "secret", "unknown",
                     id="unknown-field"),
        pytest.param({"owner": "svc", "kind": "token", "key": 12345678901234567}, "key", "string", id="not-a-string"),
    ],
)
def test_row_problems_name_the_field(fields: dict[str, Any], field: str, words: str) -> None:
    rows, problems = credential_import.parse(jsonl(fields), "jsonl", PolicySettings(), b"k" * 32)
    assert not rows
    assert any(p.line == 1 and p.field == field and words in p.message for p in problems), problems
    for name in ("key", "hash", "client_id", "owner"):
        value = fields.get(name)
        if isinstance(value, str):
            assert all(value not in str(p) for p in problems)


def test_csv_lines_and_never_expiring_rows() -> None:
    text = ("owner,name,kind,expires_at,key,hash,scheme,client_id\n"
            f"svc,one,token,never,{TOKEN},,,\n"
            "\n"
            f'svc,"two,\nlines",key,,{SECRET},,,AKIA9\n'
            "svc,bad,token,,,,,\n")
    rows, problems = credential_import.parse(text, "csv", PolicySettings(allow_never_expires=True), b"k" * 32)
    assert [r.line for r in rows] == [2, 4] and rows[0].expires_at is None and rows[1].name == "two,\nlines"
    assert [str(p) for p in problems] == ["line 6: key: give the plaintext key, or hash and scheme"]
    rows, _ = credential_import.parse(text, "csv", PolicySettings(), b"k" * 32)
    assert rows[0].capped  # "never" is capped by policy.max_expiry_days unless allowed
    assert credential_import.detect_format("keys.txt", "owner,kind\n") == "csv"
    assert credential_import.detect_format("keys.txt", '{"owner": "x"}\n') == "jsonl"
    assert TOKEN not in repr(rows[0])


async def test_the_cli_reports_by_line_and_exits_1(env: dict[str, str], settings: Settings, pool: Any,
                                                   tmp_path: Path) -> None:
    await owner(settings, pool)
    path = tmp_path / "keys.csv"
    path.write_text(f"owner,kind,key\nsvc,token,{TOKEN}\nghost,token,{SECRET}\n")
    with pytest.raises(RuntimeError) as failed:
        await cli(env, "credentials", "import", str(path), "--dry-run")
    assert "line 3: owner: no such user or service account" in str(failed.value)
    assert SECRET not in str(failed.value)
    path.write_text(f"owner,kind,key\nsvc,token,{TOKEN}\n")
    dry = json.loads(await cli(env, "credentials", "import", str(path), "--dry-run"))
    assert dry["dry_run"] and dry["rows"] == 1 and dry["imported"] == 0
    done = json.loads(await cli(env, "credentials", "import", str(path)))
    assert done["imported"] == 1
    shown = json.loads(await cli(env, "credentials", "show", done["ids"][0]))
    assert shown["legacy"] is True
