"""`credgate credentials report-leak`: a leaked credential revoked by hand, audited, shown as `revoked (exposed)`
with its URL in the API and the web UI; a false positive changes nothing; the token is never printed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

from gateway.core import exposure, formats
from tests.admin.test_ui_credentials import get, sign_in
from tests.admin.world import World, world

__all__ = ["world"]  # the fixture, re-exported for pytest

URL = "https://github.com/acme/app/blob/0123abc/config/.env#L3"


async def report_leak(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "admin", "credentials", "report-leak", *args, "--json"],
                              capture_output=True, text=True, env=env, input=stdin, timeout=60)

    proc = await asyncio.to_thread(run)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


async def exposed_events(world: World, public_id: str) -> list[Any]:
    return list(await world.pool.fetch(
        "SELECT actor, changes FROM audit_events WHERE action = 'credential.exposed' AND target = $1", public_id))


async def test_report_leak_revokes_as_exposed_and_the_api_and_ui_show_it(world: World, env: dict[str, str]) -> None:
    issued = await world.credential("svc", name="leaky")
    assert issued.token is not None
    public_id = issued.credential["id"]
    proc = await report_leak(env, issued.token, "--url", URL)
    assert issued.token not in proc.stdout + proc.stderr
    answer = json.loads(proc.stdout)
    assert answer == {"token_hash": exposure.token_hash(issued.token), "label": "true_positive",
                      "credential": public_id, "revoked": True}

    reply = await world.call("GET", f"/api/v1/credentials/{public_id}", "root")
    assert reply.status == 200, reply.text
    assert reply.body["status"] == "revoked" and reply.body["status_label"] == "revoked (exposed)"
    assert (reply.body["revocation_reason"], reply.body["exposed_url"]) == ("exposed", URL)
    [event] = await exposed_events(world, public_id)
    assert event["actor"].startswith("cli:")
    changes = event["changes"]
    assert (json.loads(changes) if isinstance(changes, str) else changes) == {"url": URL, "source": "manual"}

    await sign_in(world, "root")
    detail = await get(world, f"/credentials/{public_id}")
    assert detail.status == 200 and "Revoked (exposed)" in detail.text and URL in detail.text
    listing = await get(world, "/credentials?status=all")
    assert "Revoked (exposed)" in listing.text

    # an administrator's revocation reads plain "revoked"
    other = await world.credential("svc", name="plain")
    reply = await world.call("DELETE", f"/api/v1/credentials/{other.credential['id']}", "root")
    reply = await world.call("GET", f"/api/v1/credentials/{other.credential['id']}", "root")
    assert reply.body["status_label"] == reply.body["status"]
    assert reply.body["revocation_reason"] is None and reply.body["exposed_url"] is None


async def test_report_leak_of_a_key_pair_from_stdin(world: World, env: dict[str, str]) -> None:
    issued = await world.credential("svc", kind="key")
    assert issued.client_id is not None and issued.secret is not None
    pair = f"{issued.client_id}:{issued.secret}"
    proc = await report_leak(env, "-", "--url", URL, "--source", "pastebin", stdin=pair + "\n")
    assert issued.secret not in proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["label"] == "true_positive"
    [event] = await exposed_events(world, issued.credential["id"])
    changes = event["changes"]
    assert (json.loads(changes) if isinstance(changes, str) else changes)["source"] == "pastebin"
    # reported again: still a true positive, nothing more written
    again = json.loads((await report_leak(env, pair, "--url", URL)).stdout)
    assert again["label"] == "true_positive" and again["revoked"] is False
    assert len(await exposed_events(world, issued.credential["id"])) == 1


async def test_report_leak_of_a_wrong_secret_changes_nothing(world: World, env: dict[str, str]) -> None:
    issued = await world.credential("svc")
    public_id = issued.credential["id"]
    wrong = formats.generate_token(public_id)
    answer = json.loads((await report_leak(env, wrong, "--url", URL)).stdout)
    assert answer["label"] == "false_positive" and answer["credential"] is None and answer["revoked"] is False
    reply = await world.call("GET", f"/api/v1/credentials/{public_id}", "root")
    assert reply.body["status"] == "valid" and reply.body["status_label"] == "valid"
    assert await exposed_events(world, public_id) == []
