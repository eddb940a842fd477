"""The `credgate` command: servers (up, gateway, admin), migrate, and user, group and credential management."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import asyncpg

from admin import cli_audit, cli_import, cli_leaks, cli_webhooks, lifecycle
from admin.cli_support import CliError, open_pool, print_result, to_json
from admin.credential_limits import KEEP, Change
from gateway.core import admin_sql, store
from gateway.core.settings import Settings, SettingsError, exit_on_error, load_settings

# A lifecycle error naming one of these fields is reported under the option that gave it.
OPTIONS = {"rate_limit": "--rate-limit", "quota": "--quota"}


# --- commands ---------------------------------------------------------------------------------------------


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        async with pool.acquire() as conn:
            applied = await store.migrate(conn)
    finally:
        await pool.close()
    return {
        "applied": applied,
        "message": f"applied {len(applied)} migration(s)" if applied else "schema is up to date",
    }


async def cmd_users_create(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        created = await lifecycle.create_principal(
            pool,
            lifecycle.cli_actor(),
            lifecycle.secret_hasher(settings.argon2),
            args.name,
            service=args.service,
            admin=args.admin,
            groups=args.group or [],
            generate=args.admin and not args.service,
        )
    finally:
        await pool.close()
    out = dict(created.principal)
    if created.password is not None:
        out["password"] = created.password
        out["message"] = f"created {args.name}; password (shown once): {created.password}"
    else:
        out["message"] = f"created {'service account' if args.service else 'user'} {args.name}"
    return out


async def cmd_users_list(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        rows = await pool.fetch(admin_sql.LIST_PRINCIPALS, None, 0, 10_000)
    finally:
        await pool.close()
    return [lifecycle.public_principal(r) for r in rows]


async def cmd_users_disable(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        return await lifecycle.set_disabled(pool, lifecycle.cli_actor(), args.name, disabled=args.cmd == "disable")
    finally:
        await pool.close()


async def cmd_users_password(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        hash_secret = lifecycle.secret_hasher(settings.argon2)
        password = await lifecycle.reset_password(pool, lifecycle.cli_actor(), hash_secret, args.name)
    finally:
        await pool.close()
    return {
        "name": args.name,
        "password": password,
        "message": f"new password for {args.name} (shown once): {password}",
    }


async def cmd_groups_create(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        return await lifecycle.create_group(pool, lifecycle.cli_actor(), args.name, args.description or "")
    finally:
        await pool.close()


async def cmd_groups_list(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        rows = await pool.fetch(admin_sql.LIST_GROUPS)
    finally:
        await pool.close()
    return [{"name": r["name"], "description": r["description"], "members": list(r["members"])} for r in rows]


async def cmd_groups_member(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        changed = await lifecycle.change_membership(
            pool, lifecycle.cli_actor(), args.group, args.user, add=args.cmd == "add-member"
        )
    finally:
        await pool.close()
    return {"group": args.group, "user": args.user, "changed": changed}


def parse_expires(value: str | None) -> int | Literal["never"] | None:
    if value is None:
        return None
    if value == "never":
        return "never"
    try:
        days = int(value)
    except ValueError:
        raise CliError("--expires-in takes a number of days or 'never'") from None
    return days


async def cmd_credentials_create(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        issued = await lifecycle.create_credential(
            pool,
            lifecycle.cli_actor(),
            lifecycle.secret_hasher(settings.argon2),
            settings.policy,
            owner=args.owner,
            kind=args.kind,
            name=args.name or "",
            expires_in_days=parse_expires(args.expires_in),
            rate_limit=args.rate_limit,
            quota=args.quota,
        )
    finally:
        await pool.close()
    return _issued(issued, "created")


# `credentials update`'s options and their argparse destinations.
UPDATE_OPTIONS = {"--name": "name", "--owner": "owner", "--expires-in": "expires_in", "--rate-limit": "rate_limit",
                  "--quota": "quota"}


async def cmd_credentials_update(args: argparse.Namespace, settings: Settings) -> Any:
    """Only what is given changes; `--rate-limit none` / `--quota none` remove a limit."""
    given = [flag for flag, value in UPDATE_OPTIONS.items() if getattr(args, value) is not None]
    if not given:
        raise CliError("nothing to change: give at least one of " + ", ".join(UPDATE_OPTIONS))
    expires_in = parse_expires(args.expires_in)
    pool = await open_pool(settings)
    try:
        updated = await lifecycle.update_credential(
            pool, lifecycle.cli_actor(), settings.policy, args.id, name=args.name, owner=args.owner,
            expires_in_days=expires_in, change_expiry=expires_in is not None,
            rate_limit=_change(args.rate_limit), quota=_change(args.quota),
        )
    finally:
        await pool.close()
    limits = f"rate limit {updated['rate_limit'] or 'none'}, quota {updated['quota'] or 'none'}"
    return {**updated, "message": f"updated {updated['id']} ({', '.join(given)}); {limits}"}


def _change(value: str | None) -> Change:
    return KEEP if value is None else value


def _issued(issued: lifecycle.IssuedSecret, verb: str) -> dict[str, Any]:
    out = issued.reveal()
    if issued.token is not None:
        out["message"] = f"{verb} token {out['id']}; the token is shown once:\n{issued.token}"
    else:
        out["message"] = (
            f"{verb} key pair {out['id']}; the secret is shown once:\n"
            f"client_id: {issued.client_id}\nsecret:    {issued.secret}"
        )
    return out


async def cmd_credentials_list(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        async with pool.acquire() as conn:
            owner_id = (await lifecycle.get_principal(conn, args.owner))["id"] if args.owner else None
            items: list[dict[str, Any]] = []
            cursor: int | None = 0
            while cursor is not None:
                page, cursor = await lifecycle.list_credentials(
                    conn, owner_id=owner_id, status=args.status, kind=args.kind, after_id=cursor, limit=500
                )
                items.extend(page)
    finally:
        await pool.close()
    return items


async def cmd_credentials_show(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        async with pool.acquire() as conn:
            return lifecycle.public_credential(await lifecycle.get_credential(conn, args.id))
    finally:
        await pool.close()


async def cmd_credentials_rotate(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        issued = await lifecycle.rotate_credential(
            pool, lifecycle.cli_actor(), lifecycle.secret_hasher(settings.argon2), args.id, grace_seconds=args.grace
        )
    finally:
        await pool.close()
    return _issued(issued, "rotated")


async def cmd_credentials_revoke(args: argparse.Namespace, settings: Settings) -> Any:
    pool = await open_pool(settings)
    try:
        return await lifecycle.revoke_credential(pool, lifecycle.cli_actor(), args.id)
    finally:
        await pool.close()


def keys_generate(out: Path, as_json: bool) -> int:
    from gateway.identity import generate

    try:
        kid = generate(out)
    except OSError as exc:  # FileExistsError included: a key is never overwritten
        print(f"credgate: --out: cannot create {out} ({exc.strerror}); choose another path", file=sys.stderr)
        return 2
    print(to_json({"kid": kid, "private_key": str(out), "public_key": f"{out}.pub"}) if as_json else
          f"wrote {out} (private, mode 0600) and {out}.pub; key id {kid}. List it first in identity.key_files.")
    return 0


# --- output -----------------------------------------------------------------------------------------------


# --- parser -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the subcommand is not reset by the subcommand's own default
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file (default: $CREDGATE_CONFIG)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")

    parser = argparse.ArgumentParser(prog="credgate", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        parents=[common],
        help="embedded Postgres+Redis (unless configured), migrate, gateway, admin and demo upstream",
    )
    up.add_argument("--data-dir", help="where embedded servers keep their data (default .credgate)")
    gw = sub.add_parser("gateway", parents=[common], help="run the authenticating reverse proxy")
    gw.add_argument("--listen", help="HOST:PORT (overrides gateway.listen)")
    gw.add_argument("--workers", type=int, help="processes sharing the port (SO_REUSEPORT)")
    adm = sub.add_parser("admin", parents=[common], help="run the admin API")
    adm.add_argument("--listen", help="HOST:PORT (overrides admin.listen)")
    sub.add_parser("migrate", parents=[common], help="apply pending schema migrations").set_defaults(run=cmd_migrate)

    users = sub.add_parser("users", help="users and service accounts").add_subparsers(dest="cmd", required=True)
    p = users.add_parser("create", parents=[common])
    p.add_argument("name")
    p.add_argument("--service", action="store_true", help="non-interactive service account (no password)")
    p.add_argument("--group", action="append", metavar="G", help="add to group G (repeatable)")
    p.add_argument("--admin", action="store_true", help="administrator; prints a generated password once")
    p.set_defaults(run=cmd_users_create)
    users.add_parser("list", parents=[common]).set_defaults(run=cmd_users_list)
    for verb in ("disable", "enable"):
        p = users.add_parser(verb, parents=[common])
        p.add_argument("name")
        p.set_defaults(run=cmd_users_disable)
    p = users.add_parser("reset-password", parents=[common], help="new generated password, shown once")
    p.add_argument("name")
    p.set_defaults(run=cmd_users_password)

    groups = sub.add_parser("groups", help="permission groups").add_subparsers(dest="cmd", required=True)
    p = groups.add_parser("create", parents=[common])
    p.add_argument("name")
    p.add_argument("--description")
    p.set_defaults(run=cmd_groups_create)
    groups.add_parser("list", parents=[common]).set_defaults(run=cmd_groups_list)
    for verb in ("add-member", "remove-member"):
        p = groups.add_parser(verb, parents=[common])
        p.add_argument("group")
        p.add_argument("user")
        p.set_defaults(run=cmd_groups_member)

    keys = sub.add_parser("keys", help="signing keys for the signed identity").add_subparsers(dest="cmd", required=True)
    p = keys.add_parser("generate", help="write a new Ed25519 key pair (PEM) for identity.key_files")
    p.add_argument("--out", required=True, help="path of the private key; the public key goes to OUT.pub")
    p.add_argument("--json", action="store_true")

    creds = sub.add_parser("credentials", help="tokens and key pairs").add_subparsers(dest="cmd", required=True)
    p = creds.add_parser("create", parents=[common], help="create a credential; prints the secret once")
    p.add_argument("--owner", required=True, help="the user or service account it acts as")
    p.add_argument("--kind", choices=("token", "key"), required=True)
    p.add_argument("--name", help="a label")
    p.add_argument("--expires-in", metavar="DAYS|never", help="lifetime in days (default: policy, 90)")
    _limit_options(p, "")
    p.set_defaults(run=cmd_credentials_create)
    p = creds.add_parser("update", parents=[common], help="change what is given; the gateways see it at once")
    p.add_argument("id")
    p.add_argument("--name", help="a new label")
    p.add_argument("--owner", help="hand it to another user or service account")
    p.add_argument("--expires-in", metavar="DAYS|never", help="a new lifetime in days from now")
    _limit_options(p, "|none")
    p.set_defaults(run=cmd_credentials_update)
    p = creds.add_parser("list", parents=[common])
    p.add_argument("--owner")
    p.add_argument("--status", choices=("valid", "expired", "suspended", "revoked"))
    p.add_argument("--kind", choices=("token", "key"))
    p.set_defaults(run=cmd_credentials_list)
    for verb, run in (("show", cmd_credentials_show), ("revoke", cmd_credentials_revoke)):
        p = creds.add_parser(verb, parents=[common])
        p.add_argument("id")
        p.set_defaults(run=run)
    p = creds.add_parser("rotate", parents=[common], help="new secret, same id; prints it once")
    p.add_argument("id")
    p.add_argument("--grace", type=int, default=0, metavar="SECONDS", help="old secret keeps working this long")
    p.set_defaults(run=cmd_credentials_rotate)
    cli_audit.register(sub, common)
    cli_leaks.register(sub, common)
    cli_import.register(sub, common)
    cli_webhooks.register(sub, common, users)
    return parser


def _limit_options(parser: argparse.ArgumentParser, clear: str) -> None:
    parser.add_argument("--rate-limit", metavar=f"N/second|minute|hour{clear}",
                        help="requests per second, minute or hour, e.g. 100/minute (default: no limit)")
    parser.add_argument("--quota", metavar=f"N/day|month{clear}",
                        help="requests per calendar day or month (UTC), e.g. 100000/month (default: no quota)")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None)
    args.json = getattr(args, "json", False)
    if args.command == "up":
        from admin.devenv.up import run_up

        raise SystemExit(run_up(args))
    if args.command == "keys":  # needs no configuration: the key is made before the config names it
        raise SystemExit(keys_generate(Path(args.out), args.json))
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        exit_on_error(exc)
    if args.command == "gateway":
        from gateway.server import run_gateway

        raise SystemExit(run_gateway(settings, listen=args.listen, workers=args.workers, config_path=args.config))
    if args.command == "admin":
        from admin.server import run_admin

        raise SystemExit(run_admin(settings, listen=args.listen))
    try:
        result = asyncio.run(args.run(args, settings))
    except lifecycle.LifecycleError as exc:
        option = OPTIONS.get(exc.field or "")
        _fail(args.json, exc.code, f"{option}: {exc.message}" if option else exc.message)
    except CliError as exc:
        _fail(args.json, "error", str(exc))
    except asyncpg.UndefinedTableError:
        _fail(args.json, "error", "the database has no credgate schema yet; run `credgate migrate`")
    except asyncpg.PostgresError as exc:
        _fail(args.json, "error", f"database error: {exc.__class__.__name__}: {exc}")
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    print_result(result, args.json)


def _fail(as_json: bool, code: str, message: str) -> None:
    if as_json:
        print(to_json({"error": code, "message": message}), file=sys.stderr)
    else:
        print(f"credgate: {message}", file=sys.stderr)
    raise SystemExit(1)
