"""The shipped forward-auth configurations, end to end: client -> proxy -> credgate's forward-auth listener, and
on success proxy -> recording upstream. Each proxy is started once for the module; every case runs on each."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import posixpath
import re
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import yarl

from gateway.identity import generate
from tests.conftest import credgate_env
from tests.forward_auth import proxies
from tests.support import GatewayProcess, Upstream, cli, free_port, running_gateway, start_upstream, write_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

IDENTITY = proxies.IDENTITY
# Every character HTTP allows in a header name besides letters, digits and "-": CGI, WSGI and PHP backends read
# each as "_", so X~Auth~User is X-Auth-User to them.
ALIAS_CHARS = "_.~!#$%&'*+^`|"
SPOOF = "mallory"
PROXY_NAMES = tuple(proxies.SPECS)
ENDPOINTS = ("/nginx", "/traefik", "/caddy", "/envoy/svc")


def alias_key(name: str) -> str:
    """The variable a CGI-style backend reads a header into: X_Auth_User, x.auth.user -> HTTP_X_AUTH_USER."""
    return "HTTP_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


IDENTITY_KEYS = {alias_key(name): name for name in IDENTITY}


def spellings(name: str) -> list[str]:
    """Client-sent copies of an identity header: letter cases, each alias character, mixed separators."""
    parts = name.split("-")
    found = [name, name.upper(), name.lower(), "-".join(p.swapcase() for p in parts)]
    found += [char.join(parts) for char in ALIAS_CHARS]
    found += ["_".join(parts).lower(), ".".join(parts).upper()]
    if len(parts) > 2:
        found += [parts[0] + "-" + "_".join(parts[1:]), parts[0] + "_" + "-".join(parts[1:]),
                  parts[0] + "." + "_".join(parts[1:]).lower()]
    return list(dict.fromkeys(found))


# --- the stack: database, credentials, upstream, gateway -----------------------------------------------------


@dataclass
class Stack:
    gateway: GatewayProcess
    forward_auth_port: int
    upstream: Upstream
    creds: dict[str, Any]
    access_log: Path

    async def logged(self, path: str, within: float = 5) -> dict[str, Any]:
        """credgate's access-log line for the request for `path` (lines are written every 0.2 s)."""
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            if self.access_log.exists():
                for line in self.access_log.read_text().splitlines():
                    record: dict[str, Any] = json.loads(line)
                    if record.get("path") == path:
                        return record
            await asyncio.sleep(0.1)
        raise AssertionError(f"no access-log line for {path}")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    # What the upstream received for this request: (method, raw target, [(name, value)], body bytes) each.
    seen: list[tuple[str, str, list[tuple[str, str]], int]]


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def _credentials(env: dict[str, str]) -> dict[str, Any]:
    await cli(env, "groups", "create", "finance")
    await cli(env, "users", "create", "svc", "--service", "--group", "finance")
    await cli(env, "users", "create", "bob")
    create = ("credentials", "create", "--owner")
    token, key, bob, revoked = [
        json.loads(out)
        for out in await asyncio.gather(
            cli(env, *create, "svc", "--kind", "token", "--name", "t1"),
            cli(env, *create, "svc", "--kind", "key", "--name", "k1"),
            cli(env, *create, "bob", "--kind", "token"),
            cli(env, *create, "svc", "--kind", "token", "--name", "gone"),
        )
    ]
    await cli(env, "credentials", "revoke", revoked["id"])
    return {"token": token, "key": key, "bob": bob, "revoked": revoked}


async def _access_token(gateway: GatewayProcess, key: dict[str, str]) -> dict[str, str]:
    """An OAuth2 client-credentials access token for the key pair, from the gateway's public listener."""
    async with aiohttp.ClientSession() as session, session.post(
        gateway.url + "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=basic(key["client_id"], key["secret"]),
    ) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
    return {"token": answer["access_token"], "scope": answer["scope"], "id": key["id"]}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(pg_url: str, template_db: str, redis_url: str) -> AsyncIterator[Stack]:
    name = f"credgate_fa_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    client = aioredis.from_url(redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    upstream = await start_upstream()
    try:
        with tempfile.TemporaryDirectory(prefix="credgate-fa-") as tmp_name:
            tmp = Path(tmp_name)
            env = credgate_env(_with_database(pg_url, name), redis_url, tmp)
            creds = await _credentials(env)
            identity_key = tmp / "identity.pem"
            generate(identity_key)
            config = write_config(
                tmp / "gw.toml",
                [
                    {"prefix": "/", "upstream": upstream.url},
                    {"prefix": "/finance", "upstream": upstream.url, "groups": ["finance"]},
                    {"prefix": "/public", "upstream": upstream.url, "auth": "none"},
                    {"prefix": "/limited", "upstream": upstream.url, "rate_limit": "1/minute"},
                    {"prefix": "/signed", "upstream": upstream.url, "identity_assertion": True},
                ],
                # Only 127.0.0.1 may ask: test_untrusted_peer_is_refused comes from 127.0.0.2.
                extra='[forward_auth]\ntrusted_proxies = ["127.0.0.1/32"]\n'
                f'[identity]\nkey_files = ["{identity_key}"]\n',
            )
            port = free_port()
            access_log = tmp / "access.log"
            fa_env = {
                "CREDGATE_FORWARD_AUTH_LISTEN": f"127.0.0.1:{port}",
                "CREDGATE_GATEWAY_ACCESS_LOG": str(access_log),
            }
            async with running_gateway(env, config, tmp, extra_env=fa_env) as gateway:
                await _wait_port(port, gateway)
                creds["oauth"] = await _access_token(gateway, creds["key"])
                yield Stack(gateway, port, upstream, creds, access_log)
    finally:
        await upstream.runner.cleanup()
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _wait_port(port: int, gateway: GatewayProcess, within: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"no forward-auth listener on {port}:\n{gateway.log()}") from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            await writer.wait_closed()
            return


@contextlib.asynccontextmanager
async def running_proxy(name: str, credgate_port: int, upstream_port: int) -> AsyncIterator[proxies.ProxyProcess]:
    """The proxy `name` with its shipped configuration, asking credgate_port and forwarding to upstream_port."""
    spec = proxies.SPECS[name]
    try:
        binary = await asyncio.to_thread(proxies.ensure_installed, spec)
    except proxies.ProxyUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    values = {
        "PROXY_HOST": "127.0.0.1", "PROXY_PORT": str(free_port()),
        "CREDGATE_HOST": "127.0.0.1", "CREDGATE_PORT": str(credgate_port),
        "UPSTREAM_HOST": "127.0.0.1", "UPSTREAM_PORT": str(upstream_port),
    }
    with tempfile.TemporaryDirectory(prefix=f"credgate-fa-{spec.name}-") as run_dir:
        running = await asyncio.to_thread(proxies.start, spec, binary, Path(run_dir), values)
        try:
            yield running
        finally:
            await asyncio.to_thread(running.stop)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PROXY_NAMES)
async def proxy(request: pytest.FixtureRequest, stack: Stack) -> AsyncIterator[proxies.ProxyProcess]:
    async with running_proxy(request.param, stack.forward_auth_port, stack.upstream.port) as running:
        await _wait_routed(running, lambda status: status == 200)
        yield running


async def _wait_routed(running: proxies.ProxyProcess, routed: Callable[[int], bool], within: float = 15) -> None:
    """Listening is not routing (Traefik loads its file provider after binding): wait for a routed answer."""
    deadline = asyncio.get_running_loop().time() + within
    status = 0
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            try:
                async with session.get(running.url + "/public/ready") as resp:
                    status = resp.status
                    if routed(status):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{running.spec.name} did not route /public/ready (last status {status}):\n{running.log()}")


# --- requests ----------------------------------------------------------------------------------------------


async def send(
    stack: Stack,
    base_url: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    method: str = "GET",
    body: bytes | None = None,
) -> Answer:
    """One request with the target exactly as written; the upstream records it has for this request."""
    marker = uuid.uuid4().hex
    target += ("&" if "?" in target else "?") + f"m={marker}"
    async with aiohttp.ClientSession() as session, session.request(
        method, yarl.URL(base_url + target, encoded=True), headers=list(headers), data=body, allow_redirects=False
    ) as resp:
        answer_body = await resp.read()
        answer_headers = {k.lower(): v for k, v in resp.headers.items()}
        status = resp.status
    seen = [
        (r["method"], r["path"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in r["headers"]], r["body_bytes"])
        for r in stack.upstream.seen
        if marker in r["path"]
    ]
    return Answer(status, answer_headers, answer_body, seen)


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def credential_headers(stack: Stack, kind: str | None) -> list[tuple[str, str]]:
    creds = stack.creds
    if kind is None:
        return []
    if kind == "key":
        return [("accessKey", creds["key"]["client_id"]), ("secretKey", creds["key"]["secret"])]
    if kind == "basic":
        return list(basic(creds["key"]["client_id"], creds["key"]["secret"]).items())
    if kind == "wrong":
        token = creds["token"]["token"]
        return bearer(token[:-1] + ("A" if token[-1] != "A" else "B"))
    return bearer(creds[kind]["token"])


def identity_at_upstream(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every header the upstream got that a CGI-style backend would read as an identity header."""
    return [(k, v) for k, v in headers if alias_key(k) in IDENTITY_KEYS]


def assert_identity(answer: Answer, expected: dict[str, str]) -> None:
    """Exactly one request upstream, carrying exactly the expected identity headers (dash form) and no credential."""
    assert len(answer.seen) == 1, answer
    _, _, headers, _ = answer.seen[0]
    got = identity_at_upstream(headers)
    names = [k.lower() for k, _ in got]
    assert len(names) == len(set(names)), f"an identity header twice: {got}"
    assert {k.lower() for k, _ in got} == {k.lower() for k in expected}, got
    values = {k.lower(): v for k, v in got}
    for name, value in expected.items():
        assert value == "*" or values[name.lower()] == value, (name, values)
    assert all(SPOOF not in v for _, v in headers), headers
    assert not {k.lower() for k, _ in headers} & {"authorization", "accesskey", "secretkey"}, headers


def identity_of(stack: Stack, kind: str) -> dict[str, str]:
    """The identity headers credgate answers with for the svc credential `kind` ("*": any value)."""
    cred = stack.creds["key" if kind in ("key", "basic") else "token" if kind == "signed" else kind]
    expected = {
        "X-Auth-User-Id": "*",
        "X-Auth-User": "svc",
        "X-Auth-Groups": "finance",
        "X-Auth-Credential-Id": cred["id"],
        "X-Auth-Credential-Name": "k1" if kind in ("key", "basic", "oauth") else "t1",
        "X-Auth-Method": {"key": "headers", "basic": "basic", "oauth": "oauth"}.get(kind, "bearer"),
    }
    if kind == "oauth":
        expected["X-Auth-Scope"] = cred["scope"]
    if kind == "signed":
        expected["Credgate-Identity"] = "*"
    return expected


# --- the matrix --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    credential: str | None
    status: int
    # Allowed cases: whose identity the upstream receives ("" = none, a public route).
    identity: str | None = None


DECISIONS = (
    Case("bearer", "/svc/a", "token", 200, "token"),
    Case("key-pair", "/svc/a", "key", 200, "key"),
    Case("basic", "/svc/a", "basic", 200, "basic"),
    Case("group-member", "/finance/a", "token", 200, "token"),
    Case("oauth", "/svc/a", "oauth", 200, "oauth"),
    Case("signed-identity", "/signed/a", "token", 200, "signed"),
    Case("public", "/public/a", None, 200, ""),
    Case("missing", "/svc/a", None, 401),
    Case("wrong-secret", "/svc/a", "wrong", 401),
    Case("revoked", "/svc/a", "revoked", 401),
    Case("wrong-group", "/finance/a", "bob", 403),
)


@pytest.mark.parametrize("case", DECISIONS, ids=lambda c: c.id)
async def test_decision_reaches_client_and_upstream(
    proxy: proxies.ProxyProcess, stack: Stack, case: Case
) -> None:
    answer = await send(stack, proxy.url, case.path, credential_headers(stack, case.credential))
    assert answer.status == case.status, (answer.status, answer.body[:300])
    if case.identity is None:
        assert answer.seen == [], "a refused request reached the upstream"
        if case.status == 401:
            assert answer.headers.get("www-authenticate", "").startswith("Bearer"), answer.headers
    elif case.identity == "":
        assert_identity(answer, {})
    else:
        assert_identity(answer, identity_of(stack, case.identity))
    # The credential is never echoed, whatever the answer.
    for _, value in credential_headers(stack, case.credential):
        secret = value.rsplit(" ", 1)[-1]
        assert secret not in answer.body.decode(errors="replace") and secret not in str(answer.headers)


@pytest.mark.parametrize("route", ["/svc/spoof", "/public/spoof"])
@pytest.mark.parametrize("name", IDENTITY)
async def test_spoofed_identity_never_reaches_upstream(
    proxy: proxies.ProxyProcess, stack: Stack, name: str, route: str
) -> None:
    spoofed = [(spelling, SPOOF) for spelling in spellings(name)]
    public = route.startswith("/public")
    answer = await send(stack, proxy.url, route, spoofed + ([] if public else credential_headers(stack, "token")))
    assert answer.status == 200, (answer.status, answer.body[:300])
    assert_identity(answer, {} if public else identity_of(stack, "token"))


# Original URIs that normalise into /finance from /public. None may reach a protected upstream path without a
# credential: the proxy refuses, credgate refuses, or what reaches the upstream is still under /public.
TRAVERSALS = (
    "/public/../finance/x",
    "/public/%2e%2e/finance/x",
    "/public/%2E%2E/finance/x",
    "/public/..%2ffinance/x",
    "/public/%2e%2e%2ffinance/x",
    "/public/..%5cfinance/x",
    "/public/..;/finance/x",
    "/public//../finance/x",
    "/public/./../finance/x",
    "/public%2f..%2ffinance/x",
)


def normalised(target: str) -> str:
    """What a lenient upstream may make of a path: decoded until stable, backslashes as slashes, dots resolved."""
    path = target.split("?", 1)[0]
    for _ in range(3):
        path = unquote(path)
    path = path.replace("\\", "/").replace(";", "/")
    return posixpath.normpath(path)


@pytest.mark.parametrize("target", TRAVERSALS)
async def test_traversal_from_public_route_is_no_way_in(proxy: proxies.ProxyProcess, stack: Stack, target: str) -> None:
    answer = await send(stack, proxy.url, target)
    if 200 <= answer.status < 300:
        for _, path, headers, _ in answer.seen:
            assert normalised(path) == "/public" or normalised(path).startswith("/public/"), path
            assert identity_at_upstream(headers) == []
    else:
        assert answer.status in (400, 401, 403, 404), answer.status
        assert answer.seen == [], answer.seen


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_any_method_and_its_body_reach_upstream(proxy: proxies.ProxyProcess, stack: Stack, method: str) -> None:
    body = b"x" * 100_000  # the auth request carries none of it; the upstream request all of it
    answer = await send(stack, proxy.url, "/svc/body", credential_headers(stack, "token"), method, body)
    assert answer.status == 200, (answer.status, answer.body[:300])
    assert_identity(answer, identity_of(stack, "token"))
    assert [(m, size) for m, _, _, size in answer.seen] == [(method, len(body))]
    refused = await send(stack, proxy.url, "/svc/body", [], method, body)
    assert refused.status == 401 and refused.seen == []


async def test_client_cannot_name_the_original_uri(proxy: proxies.ProxyProcess, stack: Stack) -> None:
    """A client-sent X-Original-URI / X-Forwarded-Uri (any spelling) never replaces the URI the proxy reports."""
    claims = [(h, "/public/x") for h in ("X-Original-URI", "X_Original_URI", "X-Forwarded-Uri", "x-forwarded-uri",
                                         "X_Forwarded_Uri", "X-Envoy-Original-Path", "X-Forwarded-Prefix")]
    claims += [("X-Original-Method", "GET"), ("X-Forwarded-Method", "GET")]
    answer = await send(stack, proxy.url, "/finance/x", claims)
    assert answer.status in (400, 401), (answer.status, answer.body[:300])
    assert answer.seen == []


async def test_client_cannot_claim_its_address(proxy: proxies.ProxyProcess, stack: Stack) -> None:
    """credgate's throttles and address limits count the address the proxy saw, not one the client claims."""
    claims = [("X-Real-IP", "203.0.113.7"), ("X-Forwarded-For", "203.0.113.8"), ("Forwarded", "for=203.0.113.9"),
              ("X-Client-IP", "203.0.113.10"), ("True-Client-IP", "203.0.113.11")]
    path = f"/svc/address-{uuid.uuid4().hex}"  # the access log has the path, not the query
    answer = await send(stack, proxy.url, path, claims + credential_headers(stack, "token"))
    assert answer.status == 200, answer.status
    record = await stack.logged(path)
    # The proxy's own account of the peer (Envoy 1.40 reports a 127.0.0.1 peer as 192.0.2.2 in X-Forwarded-For).
    assert not record["client"].startswith("203.0.113."), record


async def test_rate_limit_is_429_with_retry_after(proxy: proxies.ProxyProcess, stack: Stack) -> None:
    # /limited allows one request a minute per credential: whichever proxy runs first spends it.
    first = await send(stack, proxy.url, "/limited/x", credential_headers(stack, "key"))
    assert first.status in (200, 429), first.status
    second = await send(stack, proxy.url, "/limited/x", credential_headers(stack, "key"))
    assert second.status == 429, (second.status, second.body[:300])
    assert int(second.headers["retry-after"]) > 0, second.headers
    assert second.seen == []


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_untrusted_peer_is_refused(stack: Stack, endpoint: str) -> None:
    headers = {
        "X-Original-URI": "/svc/x", "X-Original-Method": "GET",
        "X-Forwarded-Uri": "/svc/x", "X-Forwarded-Method": "GET", "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "example.test", "Authorization": f"Bearer {stack.creds['token']['token']}",
    }
    url = f"http://127.0.0.1:{stack.forward_auth_port}{endpoint}"
    for local in ("127.0.0.2", "127.0.0.1"):
        connector = aiohttp.TCPConnector(local_addr=(local, 0))
        async with aiohttp.ClientSession(connector=connector) as session, session.get(url, headers=headers) as resp:
            body = await resp.read()
            if local == "127.0.0.2":
                assert resp.status == 403, (resp.status, body)
                assert not any(k.lower().startswith("x-auth-") for k in resp.headers), resp.headers
            else:  # the same request from the trusted proxy address is decided
                assert resp.status == 200, (resp.status, body)
                assert resp.headers["X-Auth-User"] == "svc"


@pytest.mark.parametrize("name", PROXY_NAMES)
async def test_credgate_unreachable_fails_closed(stack: Stack, name: str) -> None:
    """With nothing listening where credgate should be, nothing is forwarded, public routes included."""
    async with running_proxy(name, free_port(), stack.upstream.port) as running:
        await _wait_routed(running, lambda status: status != 404)  # Traefik: 404 until its routes are loaded
        for path in ("/public/down", "/svc/down"):
            answer = await send(stack, running.url, path, credential_headers(stack, "token"))
            assert answer.status in (500, 502, 503), (path, answer.status)
            assert answer.seen == []
