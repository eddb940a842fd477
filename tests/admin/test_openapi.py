"""The OpenAPI document: it validates, it lists exactly the routes the server has, and a bounded schemathesis
run against the live server (authenticated as an admin) finds no 5xx and no response that breaks it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from openapi_spec_validator import validate

from admin import openapi
from admin.app import API, ROUTES
from tests.admin.world import World, world

__all__ = ["world"]

SCHEMATHESIS_CHECKS = ",".join((
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
    "response_schema_conformance",
))
# Seconds of fuzzing (make test keeps the whole run near a minute); the seed keeps it repeatable.
SCHEMATHESIS_SECONDS = 40


def test_document_is_valid_openapi_3_1() -> None:
    document = openapi.document()
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_document_lists_exactly_the_served_routes() -> None:
    documented = {(method.upper(), path) for path, item in openapi.document()["paths"].items()
                  for method in item if method != "parameters"}
    served = {(method, API + path) for method, path, _ in ROUTES}
    assert documented == served


def test_every_operation_documents_its_errors_with_the_error_schema() -> None:
    for path, item in openapi.document()["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


async def test_served_document_matches(world: World) -> None:
    reply = await world.call("GET", "/api/v1/openapi.json")
    assert reply.status == 200
    assert reply.body == openapi.document()


async def test_schemathesis_finds_no_server_errors_or_schema_violations(world: World, tmp_path: Path) -> None:
    # A session, not a bearer token: schemathesis finds credential ids in listings and would rotate its own
    # token away. Logging out is left out for the same reason (the role matrix covers it).
    cookie, csrf = await world.login("root")
    base = str(world.client.make_url("/")).rstrip("/")
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "run", f"{base}/api/v1/openapi.json",
        "--url", base, "--checks", SCHEMATHESIS_CHECKS, "--max-examples", "8", "--seed", "20240601",
        "--phases", "examples,coverage,fuzzing", "--max-time", str(SCHEMATHESIS_SECONDS), "--request-timeout", "10",
        "--generation-database", "none", "--no-color", "--workers", "1",
        "--generation-with-security-parameters", "false",
        "-H", f"Cookie: credgate_session={cookie}", "-H", f"X-CSRF-Token: {csrf}",
        "--exclude-name", "DELETE /api/v1/session",
    ]
    process = await asyncio.create_subprocess_exec(*command, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), SCHEMATHESIS_SECONDS + 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-6000:]
    # the run really was authenticated all along
    assert (await world.call("GET", "/api/v1/session")).status == 200
