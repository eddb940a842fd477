"""The credgate CLI end to end as a subprocess against real Postgres: users, groups, credentials, audit."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import asyncpg

from gateway.core import formats


def run(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "admin", *args], capture_output=True, text=True, env=env, timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def run_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(run(env, *args, "--json").stdout)


async def test_token_lifecycle_and_no_plaintext(env: dict[str, str], database_url: str) -> None:
    run(env, "groups", "create", "finance")
    user = run_json(env, "users", "create", "svc-report", "--service", "--group", "finance")
    assert user["kind"] == "service" and user["groups"] == ["finance"] and "password" not in user
    created = run_json(env, "credentials", "create", "--owner", "svc-report", "--kind", "token", "--name", "nightly")
    token = created["token"]
    assert len(token) == 48 and created["kind"] == "token" and created["expires_at"]
    parsed = formats.parse_token(token)
    assert parsed is not None and parsed.public_id == created["id"]
    flipped = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    assert formats.parse_token(flipped) is None

    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT secret_hash, expires_at - created_at AS life FROM credentials")
        assert row["secret_hash"].startswith("$argon2id$")
        assert round(row["life"].total_seconds() / 86400) == 90
        tables = [
            r[0]
            for r in await conn.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        ]
        dump = ""
        for table in tables:
            dump += "\n".join(str(tuple(r)) for r in await conn.fetch(f'SELECT * FROM "{table}"'))
        assert "audit_events" in tables and "$argon2id$" in dump
        assert token not in dump and token[16:42] not in dump
        actors = {r["actor"] for r in await conn.fetch("SELECT actor FROM audit_events")}
        assert all(a.startswith("cli:") for a in actors)
    finally:
        await conn.close()

    shown = run_json(env, "credentials", "show", created["id"])
    assert shown["status"] == "valid" and "token" not in shown and "secret" not in shown
    assert token not in json.dumps(shown)
    rotated = run_json(env, "credentials", "rotate", created["id"], "--grace", "60")
    assert rotated["id"] == created["id"] and rotated["token"] != token
    assert rotated["previous_secret_expires_at"]
    revoked = run_json(env, "credentials", "revoke", created["id"])
    assert revoked["status"] == "revoked"
    listing = run_json(env, "credentials", "list", "--status", "revoked")
    assert [c["id"] for c in listing] == [created["id"]]


async def test_key_pair_users_and_policy(env: dict[str, str], database_url: str) -> None:
    admin = run_json(env, "users", "create", "root-admin", "--admin")
    assert admin["is_admin"] and len(admin["password"]) >= 16
    run(env, "users", "create", "alice")
    key = run_json(env, "credentials", "create", "--owner", "alice", "--kind", "key", "--expires-in", "7")
    assert formats.parse_client_id(key["client_id"]) == key["id"]
    assert formats.parse_key_secret(key["secret"]) == key["secret"]
    too_long = run(env, "credentials", "create", "--owner", "alice", "--kind", "key", "--expires-in", "400", ok=False)
    assert too_long.returncode == 1 and "365 days" in too_long.stderr
    never = run(env, "credentials", "create", "--owner", "alice", "--kind", "token", "--expires-in", "never", ok=False)
    assert never.returncode == 1 and "never expire" in never.stderr
    missing = run(env, "credentials", "create", "--owner", "nobody", "--kind", "token", ok=False)
    assert missing.returncode == 1 and "nobody" in missing.stderr

    disabled = run_json(env, "users", "disable", "alice")
    assert disabled["disabled"] is True
    assert run_json(env, "credentials", "show", key["id"])["status"] == "suspended"
    run(env, "users", "enable", "alice")
    assert run_json(env, "credentials", "show", key["id"])["status"] == "valid"
    names = [u["name"] for u in run_json(env, "users", "list")]
    assert names == ["root-admin", "alice"]
    run(env, "groups", "create", "ops")
    assert run_json(env, "groups", "add-member", "ops", "alice")["changed"] is True
    assert run_json(env, "groups", "list")[0]["members"] == ["alice"]
    assert run_json(env, "groups", "remove-member", "ops", "alice")["changed"] is True
    dup = run(env, "users", "create", "alice", ok=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr


def test_migrate_command_is_idempotent(env: dict[str, str]) -> None:
    out = run_json(env, "migrate")
    assert out["applied"] == []  # the test database is already migrated


def test_unreachable_database_is_one_clear_line(env: dict[str, str]) -> None:
    bad = dict(env, CREDGATE_DATABASE_URL="postgresql://postgres@127.0.0.1:1/nothing")
    proc = run(bad, "users", "list", ok=False)
    assert proc.returncode == 1 and "cannot reach the database" in proc.stderr
