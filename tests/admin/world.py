"""Shared by the admin API tests: a live admin app on a real port, principals and their credentials."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpClient

from admin import lifecycle
from admin.app import create_app
from gateway.core.settings import Settings
from gateway.core.store import Pool

PASSWORDS = {"root": "root-password-0123", "alice": "alice-password-0123", "bob": "bob-password-01234"}
_counter = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}{next(_counter)}"


@dataclass
class Reply:
    status: int
    body: Any
    text: str
    headers: CIMultiDict[str]


@dataclass
class World:
    """The admin app plus root (admin), alice and bob (self-service users) and svc (service account)."""

    client: TestClient[Any, Any]
    pool: Pool
    settings: Settings
    tokens: dict[str, str] = field(default_factory=dict)  # principal -> bearer token it authenticates with

    def bearer(self, who: str | None) -> dict[str, str]:
        return {} if who is None else {"Authorization": f"Bearer {self.tokens[who]}"}

    async def call(self, method: str, path: str, who: str | None = None, body: Any = None,
                   headers: dict[str, str] | None = None, data: bytes | None = None) -> Reply:
        sent = {**self.bearer(who), **(headers or {})}
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.client.request(method, path, headers=sent, data=data) as resp:
            text = await resp.text()
            try:
                parsed = json.loads(text) if text else None
            except ValueError:
                parsed = None
            return Reply(resp.status, parsed, text, CIMultiDict(resp.headers))

    async def credential(self, owner: str, kind: str = "token", name: str = "") -> lifecycle.IssuedSecret:
        hash_secret = lifecycle.secret_hasher(self.settings.argon2)
        return await lifecycle.create_credential(self.pool, lifecycle.cli_actor(), hash_secret,
                                                 self.settings.policy, owner=owner, kind=kind, name=name)

    async def principal(self, name: str, *, service: bool = False, password: str | None = None,
                        admin: bool = False) -> None:
        hash_secret = lifecycle.secret_hasher(self.settings.argon2)
        await lifecycle.create_principal(self.pool, lifecycle.cli_actor(), hash_secret, name,
                                         service=service, password=password, admin=admin)

    async def group(self, name: str) -> None:
        await lifecycle.create_group(self.pool, lifecycle.cli_actor(), name)

    async def login(self, name: str, password: str | None = None) -> tuple[str, str]:
        """Log in; returns (cookie value, csrf token). The client keeps the cookie too."""
        reply = await self.call("POST", "/api/v1/session",
                                body={"username": name, "password": password or PASSWORDS[name]})
        assert reply.status == 200, reply.text
        cookie = self.client.session.cookie_jar.filter_cookies(self.client.make_url("/api/v1/session"))
        return cookie["credgate_session"].value, reply.body["csrf_token"]


async def build_world(settings: Settings, pool: Pool, aiohttp_client: AiohttpClient,
                      registry: CollectorRegistry | None = None) -> World:
    client = await aiohttp_client(create_app(settings, registry))
    world = World(client, pool, settings)
    await world.principal("root", password=PASSWORDS["root"], admin=True)
    await world.principal("alice", password=PASSWORDS["alice"])
    await world.principal("bob", password=PASSWORDS["bob"])
    await world.principal("svc", service=True)
    for who in ("root", "alice", "bob", "svc"):
        issued = await world.credential(who, name=f"{who}-script")
        assert issued.token is not None
        world.tokens[who] = issued.token
    return world


@pytest.fixture
async def world(settings: Settings, pool: Pool, aiohttp_client: AiohttpClient) -> World:
    return await build_world(settings, pool, aiohttp_client)

