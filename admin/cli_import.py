"""`credgate credentials import FILE [--dry-run]`: bring legacy keys in, unchanged for their clients."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from admin import credential_import, lifecycle
from admin.cli_support import CliError, open_pool
from gateway.core.settings import Settings

__all__ = ["cmd_import", "register"]


async def cmd_import(args: argparse.Namespace, settings: Settings) -> Any:
    """Check every row; report all problems by line and write nothing, or import every row in one transaction."""
    path = Path(args.file)
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {exc.__class__.__name__}") from None
    file_format = args.format or credential_import.detect_format(path.name, text)
    pool = await open_pool(settings)
    try:
        report = await credential_import.import_credentials(
            pool, lifecycle.cli_actor(), settings.policy, settings.argon2, settings.secret_key_bytes, text,
            file_format, dry_run=args.dry_run)
    finally:
        await pool.close()
    if report.problems:
        lines = "\n".join(str(p) for p in report.problems)
        raise CliError(f"{len(report.problems)} problem(s) in {path.name}; nothing was written:\n{lines}")
    formats = ", ".join(f"{n} {name}" for name, n in sorted(report.by_format.items())) or "none"
    capped = f"; {report.capped} expiry date(s) capped at policy.max_expiry_days" if report.capped else ""
    if args.dry_run:
        message = f"dry run: {report.rows} row(s) would be imported ({formats}){capped}; nothing was written"
    else:
        message = f"imported {report.imported} credential(s) ({formats}) in {report.seconds:.1f} s{capped}"
    return {**report.as_dict(), "message": message}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add `credgate credentials import` (call after the credentials commands exist)."""
    credentials = next(action for action in sub.choices["credentials"]._actions
                       if isinstance(action, argparse._SubParsersAction))
    p = credentials.add_parser("import", parents=[common],
                               help="import legacy keys from CSV or JSON lines (one transaction)")
    p.add_argument("file", metavar="FILE", help="CSV with a header row, or one JSON object per line")
    p.add_argument("--format", choices=("csv", "jsonl"), help="default: from the file name or its first character")
    p.add_argument("--dry-run", action="store_true", help="check every row and report all problems; write nothing")
    p.set_defaults(run=cmd_import)
