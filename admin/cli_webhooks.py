"""`credgate users set-webhook` and `credgate webhooks deliveries`: owners' webhook URLs and delivery status."""

from __future__ import annotations

import argparse
from typing import Any

from admin import lifecycle, webhooks
from admin.cli_support import open_pool
from gateway.core import outbox
from gateway.core.settings import Settings

NO_CURSOR = 2**63 - 1


async def cmd_set_webhook(args: argparse.Namespace, settings: Settings) -> Any:
    url = None if args.url == "none" else args.url
    pool = await open_pool(settings)
    try:
        result = await webhooks.set_owner_url(pool, lifecycle.cli_actor(), args.name, url)
    finally:
        await pool.close()
    note = "" if settings.webhooks.secret.reveal() else " (webhooks.secret is not set: nothing is delivered yet)"
    shown = "cleared" if url is None else f"set to {result['webhook_url']}"
    return {**result, "message": f"webhook URL of {args.name} {shown}{note}"}


async def cmd_deliveries(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        rows = await pool.fetch(outbox.LIST_DELIVERIES, args.status, NO_CURSOR, args.limit)
    finally:
        await pool.close()
    return [outbox.public_delivery(r) for r in rows]


def register(sub: Any, common: argparse.ArgumentParser, users: Any) -> None:
    """Add the commands to the `credgate` parser: `sub` its subcommands, `users` the `users` subcommands."""
    p = users.add_parser("set-webhook", parents=[common],
                         help="the user's own webhook URL for its credentials' lifecycle events")
    p.add_argument("name")
    p.add_argument("url", metavar="URL|none", help="an http(s) URL, or none to clear it")
    p.set_defaults(run=cmd_set_webhook)
    hooks = sub.add_parser("webhooks", help="lifecycle-event webhooks").add_subparsers(dest="cmd", required=True)
    p = hooks.add_parser("deliveries", parents=[common], help="deliveries, newest first")
    p.add_argument("--status", choices=outbox.DELIVERY_STATUSES)
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(run=cmd_deliveries)
