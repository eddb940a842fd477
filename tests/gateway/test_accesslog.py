"""The access log: one JSON line per request with attribution, rejected requests with their reason, no secrets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import accesslog
from gateway.accesslog import FIELDS, AccessLog, AccessRecord, rfc3339
from gateway.core.formats import generate_key_secret, generate_token
from tests.support import Upstream, cli, free_port, running_gateway, write_config

ATTRIBUTION = {"time", "request_id", "client", "method", "route", "path", "status", "bytes", "duration_ms",
               "upstream_ms", "auth_method", "auth_outcome", "credential", "owner", "creator", "reason"}


@pytest.mark.slow
async def test_lines_carry_attribution_and_no_secret(env: dict[str, str], upstream: Upstream, tmp_path: Path) -> None:
    config = write_config(tmp_path / "gw.toml", [
        {"prefix": "/api", "name": "api", "upstream": upstream.url},
        {"prefix": "/finance", "name": "finance", "upstream": upstream.url, "groups": ["finance"]},
        {"prefix": "/down", "name": "down", "upstream": f"http://127.0.0.1:{free_port()}"},
    ])
    await cli(env, "groups", "create", "finance")
    await cli(env, "users", "create", "svc", "--service")
    token = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "token"))
    key = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "key"))
    wrong_token = generate_token(token["id"])
    wrong_secret = generate_key_secret()
    basic_value = "Basic " + base64.b64encode(f"{key['client_id']}:{key['secret']}".encode()).decode()
    wrong_basic = "Basic " + base64.b64encode(f"{key['client_id']}:{wrong_secret}".encode()).decode()
    cookie = "session=cookie-value-4711"
    # (request id, method, path with query, headers, expected status)
    script: list[tuple[str, str, str, dict[str, str], int]] = [
        ("r-bearer", "GET", "/api/items/1?api_key=query-secret-1&x=1", {
            "Authorization": f"Bearer {token['token']}", "Cookie": cookie}, 200),
        ("r-headers", "POST", "/api/upload?sig=query-secret-2", {
            "accessKey": key["client_id"], "secretKey": key["secret"]}, 200),
        ("r-basic", "GET", "/api/b", {"Authorization": basic_value, "Cookie": cookie}, 200),
        ("r-missing", "GET", f"/api/m?access_token={token['token']}", {}, 401),
        ("r-wrong-token", "GET", "/api/w", {"Authorization": f"Bearer {wrong_token}"}, 401),
        ("r-wrong-basic", "GET", "/api/w", {"Authorization": wrong_basic}, 401),
        ("r-wrong-headers", "GET", "/api/w", {"accessKey": key["client_id"], "secretKey": wrong_secret}, 401),
        ("r-forbidden", "GET", "/finance/x?q=query-secret-3", {"Authorization": f"Bearer {token['token']}"}, 403),
        ("r-down", "GET", "/down/x", {"Authorization": f"Bearer {token['token']}"}, 502),
        ("r-noroute", "GET", "/elsewhere", {"Authorization": f"Bearer {token['token']}"}, 404),
    ]
    connector = aiohttp.TCPConnector(force_close=True)
    async with running_gateway(env, config, tmp_path, workers=2) as gw, aiohttp.ClientSession(connector=connector) as s:
        for rid, method, path, headers, status in script:
            data = b"x" * 1000 if method == "POST" else None
            async with s.request(method, gw.url + path, headers={**headers, "X-Request-Id": rid}, data=data) as r:
                await r.read()
                assert r.status == status, (rid, r.status)
    # the gateway has stopped: every buffered line is flushed
    output = gw.log()

    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    by_id = {line["request_id"]: line for line in lines}
    assert set(by_id) == {rid for rid, *_ in script} and len(lines) == len(script)
    for line in lines:
        assert set(line) == ATTRIBUTION
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
        assert line["client"] == "127.0.0.1" and "?" not in line["path"]
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert line["bytes"] > 0

    ok = by_id["r-bearer"]
    assert ok["method"] == "GET" and ok["route"] == "api" and ok["path"] == "/api/items/1" and ok["status"] == 200
    assert ok["auth_method"] == "bearer" and ok["auth_outcome"] == "ok" and ok["reason"] is None
    assert ok["credential"] == token["id"] and ok["owner"] == "svc" and ok["creator"].startswith("cli:")
    assert ok["upstream_ms"] is not None and ok["upstream_ms"] <= ok["duration_ms"]
    assert by_id["r-headers"]["auth_method"] == "headers" and by_id["r-headers"]["credential"] == key["id"]
    assert by_id["r-headers"]["method"] == "POST" and by_id["r-headers"]["path"] == "/api/upload"
    assert by_id["r-basic"]["auth_method"] == "basic" and by_id["r-basic"]["credential"] == key["id"]

    def refused(rid: str) -> dict[str, Any]:
        line = by_id[rid]
        return {k: line[k] for k in ("status", "auth_method", "auth_outcome", "credential", "reason", "upstream_ms")}

    assert refused("r-missing") == {"status": 401, "auth_method": None, "auth_outcome": "missing",
                                    "credential": None, "reason": "unauthorized", "upstream_ms": None}
    for rid, method in (("r-wrong-token", "bearer"), ("r-wrong-basic", "basic"), ("r-wrong-headers", "headers")):
        # a wrong secret is not attributed: the caller has not proved who it is
        assert refused(rid) == {"status": 401, "auth_method": method, "auth_outcome": "invalid",
                                "credential": None, "reason": "invalid_token", "upstream_ms": None}
    # a verified caller without the group is attributed, so an operator sees who was refused
    assert refused("r-forbidden") == {"status": 403, "auth_method": "bearer", "auth_outcome": "forbidden",
                                      "credential": token["id"], "reason": "insufficient_scope", "upstream_ms": None}
    down = by_id["r-down"]
    assert down["status"] == 502 and down["auth_outcome"] == "ok" and down["reason"] == "connect"
    assert down["credential"] == token["id"] and down["upstream_ms"] is not None
    assert by_id["r-noroute"]["route"] == "-" and by_id["r-noroute"]["reason"] == "not_found"

    secrets_used = [token["token"], wrong_token, key["secret"], wrong_secret, basic_value, wrong_basic,
                    basic_value.split()[1], wrong_basic.split()[1], "query-secret", "api_key=", "access_token=",
                    "x=1", "cookie-value-4711", cookie]
    for secret in secrets_used:
        assert secret not in output, f"found a secret in the gateway's output: {secret[:6]}..."


# --- the writer itself ---------------------------------------------------------------------------------

WRITER = """
import asyncio, sys
from gateway.accesslog import AccessLog

async def main() -> None:
    async with AccessLog("stdout").running() as log:
        for i in range(3000):
            log.write({"worker": sys.argv[1], "i": i, "path": "/p/" + "x" * (i % 700)})
            if i % 100 == 0:
                await asyncio.sleep(0)

asyncio.run(main())
"""


def test_concurrent_workers_never_split_a_line() -> None:
    """Workers share one stdout pipe: each write of whole lines stays under PIPE_BUF, so none interleave."""
    read_fd, write_fd = os.pipe()
    try:
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(n)], stdout=write_fd) for n in range(3)]
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        output = pipe.read()  # until every writer has exited
    for writer in writers:
        assert writer.wait(30) == 0
    records = [json.loads(line) for line in output.splitlines()]
    assert sorted((r["worker"], r["i"]) for r in records) == sorted((str(n), i) for n in range(3) for i in range(3000))


async def test_file_target_appends_and_off_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "access.log"
    target.write_bytes(b'{"earlier":true}\n')
    async with AccessLog(str(target)).running() as log:
        log.write({"a": "\u00e9\n\"", "n": 1})
    assert [json.loads(line) for line in target.read_bytes().splitlines()] == [{"earlier": True},
                                                                               {"a": "\u00e9\n\"", "n": 1}]
    assert target.stat().st_mode & 0o777 in (0o640, 0o600, 0o644)
    off = AccessLog("off")
    off.write({"a": 1})
    off.flush()
    await off.close()
    assert not off.enabled and off.lines == []


async def test_request_line_escapes_and_nulls(tmp_path: Path) -> None:
    assert set(FIELDS) == ATTRIBUTION
    target = tmp_path / "access.log"
    log = AccessLog(str(target))
    nasty_path = b'/a"b\\c/\xe9\x00\x7f</script>'
    log.request(AccessRecord(b"rid-1", "::1", "GET", "api", nasty_path, 200, 12, 0.0012345, None, "", "none", "",
                             "", "", ""))
    log.request(AccessRecord(b"rid-2", "10.0.0.1", "POST", "api", b"/x", 401, 99, 0.5, 0.25, "basic", "invalid", "",
                             "", "", "invalid_token"))
    log.request(AccessRecord(b"rid-3", "10.0.0.1", "GET", "api", b"/y", 200, 0, 1.0, 0.9995, "bearer", "ok",
                             "AbCdEfGhIjKl", "svc", 'cli:"root"', ""))
    await log.close()
    raw = target.read_bytes()
    assert raw.isascii() and raw.count(b"\n") == 3
    first, second, third = (json.loads(line) for line in raw.splitlines())
    assert list(first) == list(FIELDS)
    assert first["path"] == nasty_path.decode("latin-1") and first["duration_ms"] == 1.234
    assert first["upstream_ms"] is None and first["auth_method"] is None and first["credential"] is None
    assert first["reason"] is None and first["client"] == "::1"
    assert second["upstream_ms"] == 250.0 and second["reason"] == "invalid_token" and second["owner"] is None
    assert third["credential"] == "AbCdEfGhIjKl" and third["creator"] == 'cli:"root"' and third["upstream_ms"] == 999.5


async def test_remembered_quotes_stay_bounded_and_exact(tmp_path: Path) -> None:
    """Quoted values are remembered for the next line, up to a bound; past it the memory starts over, and every
    line still carries its own values, escaped."""
    target = tmp_path / "access.log"
    log = AccessLog(str(target))
    owners = [f'owner-{n}-"\\-é' for n in range(accesslog._QUOTED_MAX + 100)]
    for n, owner in enumerate(owners):
        log.request(AccessRecord(b"rid", f"10.0.{n // 256}.{n % 256}", "GET", "api", b"/x", 200, 0, 0.001, None,
                                 "bearer", "ok", "AbCdEfGhIjKl", owner, "", ""))
        assert len(accesslog._QUOTED) <= accesslog._QUOTED_MAX
    await log.close()
    lines = [json.loads(line) for line in target.read_bytes().splitlines()]
    assert [line["owner"] for line in lines] == owners
    assert [line["client"] for line in lines][-1] == f"10.0.{(len(owners) - 1) // 256}.{(len(owners) - 1) % 256}"
    assert all(line["creator"] is None and line["reason"] is None for line in lines)


async def test_periodic_flush_without_close(tmp_path: Path) -> None:
    target = tmp_path / "access.log"
    async with AccessLog(str(target)).running() as log:
        log.write({"a": 1})
        for _ in range(50):
            if target.read_bytes():
                break
            await asyncio.sleep(0.05)
        assert target.read_bytes() == b'{"a":1}\n'


@pytest.mark.parametrize("epoch, text", [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (1700000000.5, "2023-11-14T22:13:20.500Z"),
    (1700000000.999, "2023-11-14T22:13:20.999Z"),
    (1700000001.001, "2023-11-14T22:13:21.001Z"),
])
def test_rfc3339(epoch: float, text: str) -> None:
    assert rfc3339(epoch) == text
    assert rfc3339(time.time()).endswith("Z")


async def test_requests_refused_by_the_data_plane_are_logged(
    env: dict[str, str], upstream: Upstream, tmp_path: Path
) -> None:
    """Framing errors and limits are refused before the request path runs: still one line each."""
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}])
    async with running_gateway(env, config, tmp_path) as gw:
        for raw in (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(raw)
            await writer.drain()
            await reader.read()
            writer.close()
            await writer.wait_closed()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith('{"time"')]
            refused = [line for line in lines if line["auth_outcome"] == "bad_request"]
            if len(refused) >= 2:
                break
            await asyncio.sleep(0.1)
    assert sorted(line["status"] for line in refused) == [400, 431]
    assert all(line["reason"] and line["route"] == "-" and line["client"] == "127.0.0.1" for line in refused)
    assert "aaaa" not in gw.log()
