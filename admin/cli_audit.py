"""`credgate audit verify` (walk the hash chain, exit 1 at the first break) and `credgate audit export` (JSON lines)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from admin.cli_support import open_pool, print_result
from gateway.core import audit_chain
from gateway.core.settings import Settings


def iso_time(text: str) -> datetime:
    """An ISO 8601 time for --since/--until; without a zone it is UTC."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r} (e.g. 2026-01-31T00:00:00Z)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


async def cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        report = await audit_chain.verify(pool)
    finally:
        await pool.close()
    result = report.as_dict()
    if report.broken is not None:
        result["message"] = report.broken.describe()
        print_result(result, args.json)
        raise SystemExit(1)
    result["message"] = (f"audit chain intact: {report.checked} row(s), head at position {report.head.seq}, "
                         f"hash {report.head.hash.hex()}")
    return result


async def cmd_audit_export(args: argparse.Namespace, settings: Settings) -> None:
    if args.until is not None and args.until <= args.since:
        print("credgate audit export: error: --until must be after --since", file=sys.stderr)
        raise SystemExit(2)  # a usage error, as argparse reports them
    pool = await open_pool(settings)
    try:
        async for event in audit_chain.export(pool, args.since, args.until):
            sys.stdout.write(audit_chain.json_line(event) + "\n")
        sys.stdout.flush()
    finally:
        await pool.close()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add `credgate audit verify|export` to the main parser's subcommands."""
    audit = sub.add_parser("audit", help="the tamper-evident audit log").add_subparsers(dest="cmd", required=True)
    audit.add_parser("verify", parents=[common],
                     help="walk the hash chain; exit 1 and name the first row that breaks it").set_defaults(
        run=cmd_audit_verify)
    p = audit.add_parser("export", parents=[common], help="audit events as JSON lines (for a SIEM), in chain order")
    p.add_argument("--since", required=True, type=iso_time, metavar="ISO8601", help="events at or after this time")
    p.add_argument("--until", type=iso_time, metavar="ISO8601", help="events before this time (default: now)")
    p.set_defaults(run=cmd_audit_export)
