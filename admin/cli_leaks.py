"""`credgate credentials report-leak`: revoke a leaked credential by hand, as the secret-scanning endpoint does."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from admin import lifecycle
from admin.cli_support import CliError, open_pool
from gateway.core import exposure, hashing
from gateway.core.settings import Settings

__all__ = ["cmd_report_leak", "register"]


async def cmd_report_leak(args: argparse.Namespace, settings: Settings) -> Any:
    """Classify the token; a live credgate credential is revoked as exposed at --url (audited)."""
    token = sys.stdin.readline().strip() if args.token == "-" else args.token
    if not token:
        raise CliError("no token given; pass it as TOKEN or on standard input with TOKEN = -")
    pool = await open_pool(settings)
    argon2 = hashing.pool_from(settings.argon2)
    try:
        report = exposure.Report(token, "manual", args.url, args.source)
        finding, = await exposure.handle_reports(pool, argon2.verify, [report], lifecycle.cli_actor(),
                                                 concurrency=argon2.concurrency)
    finally:
        argon2.close()
        await pool.close()
    if finding.public_id is None:
        message = "not a live credgate credential (false positive); nothing changed"
    elif finding.revoked:
        message = f"credential {finding.public_id} revoked (exposed at {args.url})"
    else:
        message = f"credential {finding.public_id} was revoked already; nothing changed"
    return {"token_hash": finding.token_hash, "label": finding.label, "credential": finding.public_id,
            "revoked": finding.revoked, "message": message}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add `credgate credentials report-leak TOKEN --url URL` (call after the credentials commands exist)."""
    credentials = next(action for action in sub.choices["credentials"]._actions
                       if isinstance(action, argparse._SubParsersAction))
    p = credentials.add_parser("report-leak", parents=[common],
                               help="revoke a leaked token or key pair at once, with where it was found")
    p.add_argument("token", metavar="TOKEN",
                   help="the leaked token, client_id:secret, or - to read it from standard input (keeps it out "
                        "of the shell history)")
    p.add_argument("--url", required=True, help="where it was found (recorded with the revocation)")
    p.add_argument("--source", default="manual", help="what found it, for the audit log (default: manual)")
    p.set_defaults(run=cmd_report_leak)
