"""What every `credgate` subcommand shares: the database pool, the one-line error, JSON and plain output."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from gateway.core import database, store
from gateway.core.settings import Settings

Command = Callable[[argparse.Namespace, Settings], Awaitable[Any]]


def to_json(value: Any) -> str:
    def default(obj: Any) -> Any:
        if isinstance(obj, datetime):
            return obj.isoformat().replace("+00:00", "Z")
        return str(obj)

    return json.dumps(value, default=default, indent=2, sort_keys=True)


async def open_pool(settings: Settings) -> store.Pool:
    try:
        return await database.create_pool(settings.database_url.reveal(), min_size=1, max_size=2,
                                       statement_cache_size=settings.database_statement_cache_size)
    except (TimeoutError, OSError) as exc:
        raise CliError(
            f"cannot reach the database at {settings.database_url}: {exc.__class__.__name__}: {exc}; "
            "is Postgres running (make run starts one) and database_url right?"
        ) from None


class CliError(Exception):
    """A failure reported to the operator as one line, exit status 1."""


def print_result(result: Any, as_json: bool) -> None:
    if as_json:
        if isinstance(result, dict):
            result = {k: v for k, v in result.items() if k != "message"}
        print(to_json(result))
        return
    if isinstance(result, dict) and "message" in result:
        print(result["message"])
    elif isinstance(result, list):
        for item in result:
            print(_one_line(item))
        if not result:
            print("(none)")
    elif isinstance(result, dict):
        print(_one_line(result))


def _one_line(item: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        if isinstance(v, datetime):
            return v.strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(v, list):
            return ",".join(map(str, v)) or "-"
        return "-" if v is None else str(v)

    return "  ".join(f"{k}={show(v)}" for k, v in item.items() if k not in ("created_by",))
