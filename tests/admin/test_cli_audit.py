"""`credgate audit verify|export` as a subprocess against real Postgres, and the admin service's periodic check."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry

from admin.audit_check import AuditChainCheck
from admin.metrics import AdminMetrics
from gateway.core import store


def run(env: dict[str, str], *args: str, status: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "admin", *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc


async def superuser_sql(database_url: str, sql: str) -> None:
    """What an attacker with the database superuser does: write with every trigger switched off."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_verify_names_the_altered_row(env: dict[str, str], database_url: str) -> None:
    for name in ("finance", "ops", "audit"):
        run(env, "groups", "create", name)
    intact = run(env, "audit", "verify")
    assert intact.stdout.startswith("audit chain intact: 3 row(s), head at position 3, hash ")
    assert json.loads(run(env, "audit", "verify", "--json").stdout)["ok"] is True

    conn = await asyncpg.connect(database_url)
    try:
        row_id = await conn.fetchval("SELECT id FROM audit_events WHERE chain_seq = 2")
    finally:
        await conn.close()
    await superuser_sql(database_url, "UPDATE audit_events SET target = 'finance' WHERE chain_seq = 2")
    broken = run(env, "audit", "verify", status=1)
    assert broken.stdout.strip() == (
        f"audit chain broken at row id={row_id} (chain position 2): "
        "its content does not match its hash (the row was altered, or its hash forged)")
    report = json.loads(run(env, "audit", "verify", "--json", status=1).stdout)
    assert (report["ok"], report["broken_id"], report["broken_chain_seq"], report["checked"]) == (False, row_id, 2, 1)


async def test_verify_reports_a_deleted_row(env: dict[str, str], database_url: str) -> None:
    for name in ("a", "b", "c"):
        run(env, "groups", "create", name)
    await superuser_sql(database_url, "DELETE FROM audit_events WHERE chain_seq = 2")
    broken = run(env, "audit", "verify", status=1)
    assert "(chain position 3): chain position(s) 2 before it are missing (rows were deleted)" in broken.stdout


def test_export_writes_one_json_line_per_event(env: dict[str, str]) -> None:
    run(env, "groups", "create", "finance")
    run(env, "users", "create", "alice", "--group", "finance")
    out = run(env, "audit", "export", "--since", "2000-01-01T00:00:00Z").stdout
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["action"] for e in events][:1] == ["group.create"] and len(events) >= 2
    assert [e["chain_seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["actor"].startswith("cli:") and len(e["hash"]) == 64 for e in events)
    assert events[1]["prev_hash"] == events[0]["hash"]
    assert run(env, "audit", "export", "--since", "2999-01-01").stdout == ""
    assert run(env, "audit", "export", "--since", events[0]["at"], "--until", events[0]["at"], status=2).stderr
    assert "ISO 8601" in run(env, "audit", "export", "--since", "yesterday", status=2).stderr
    assert run(env, "audit", "export", status=2).stderr  # --since is required


async def test_periodic_check_sets_the_gauge(pool: Any, database_url: str) -> None:
    registry = CollectorRegistry()
    metrics = AdminMetrics(registry)
    check = AuditChainCheck(pool, metrics.audit_chain_ok, every=300)

    def gauge() -> float | None:
        return registry.get_sample_value("credgate_audit_chain_ok")

    assert math.isnan(gauge() or 0.0)  # not verified yet: no alert either way
    async with pool.acquire() as conn:
        for i in range(3):
            await store.write_audit(conn, store.Actor("cli:test"), "thing.update", "thing", f"t{i}")
    first = await check.check_once()
    assert gauge() == 1 and first.checked == 3
    async with pool.acquire() as conn:
        await store.write_audit(conn, store.Actor("cli:test"), "thing.update", "thing", "t3")
    assert (await check.check_once()).checked == 1  # incremental: only the new row
    await superuser_sql(database_url, "UPDATE audit_events SET target = 'x' WHERE chain_seq = 4")
    broken = await check.check_once()
    assert gauge() == 0 and broken.broken is not None and broken.broken.chain_seq == 4
    await superuser_sql(database_url, "UPDATE audit_events SET target = 't3' WHERE chain_seq = 4")
    restored = await check.check_once()  # a full walk again while broken
    assert gauge() == 1 and restored.checked == 4
