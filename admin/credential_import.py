"""Importing legacy keys: parse CSV or JSON lines, report every problem by line, write all rows in one transaction.

Each row names an owner, a name, a kind (token|key), an expiry and either the plaintext key (hashed with
argon2id here, never stored) or its legacy hash and scheme (gateway.core.legacy); a key pair also names its
existing client id. Clients keep sending the same key: the gateway finds it through the legacy lookup table.
No problem message, log line or repr ever quotes a value: rows are named by line and field.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import csv
import io
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from gateway.core import formats, hashing, legacy
from gateway.core.settings import Argon2Settings, PolicySettings
from gateway.core.store import Actor, Connection, Pool, write_audit

__all__ = ["FIELDS", "ImportReport", "Problem", "detect_format", "import_credentials", "parse"]

FileFormat = Literal["csv", "jsonl"]
FIELDS = ("owner", "name", "kind", "expires_at", "key", "hash", "scheme", "client_id")
_REQUIRED = ("owner", "kind")
_MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class Problem:
    """Why one row (line) cannot be imported, naming the field; never the value."""

    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


@dataclass(slots=True, repr=False)
class Row:
    """One importable row; holds a plaintext key until it is hashed (never shown)."""

    line: int
    owner: str
    name: str
    kind: formats.CredentialKind
    expires_at: datetime | None
    capped: bool
    key: str = ""  # the plaintext key (token, or a key pair's secret), or ""
    scheme: legacy.Scheme | None = None
    legacy_hash: str = ""
    client_id: str = ""
    lookups: list[str] = field(default_factory=list)  # where the gateway finds it; [0] is written
    public_id: str = ""
    secret_hash: str = ""

    def __repr__(self) -> str:
        return f"Row(line={self.line}, kind={self.kind!r}, format={self.source!r})"

    @property
    def source(self) -> str:
        return self.scheme or "plaintext"


@dataclass(slots=True)
class ImportReport:
    """What an import did (or, for a dry run, would do)."""

    dry_run: bool
    rows: int = 0
    imported: int = 0
    capped: int = 0
    by_format: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "rows": self.rows, "imported": self.imported, "capped": self.capped,
                "by_format": self.by_format, "problems": [str(p) for p in self.problems],
                "seconds": round(self.seconds, 3), "ids": self.ids}


# --- reading ------------------------------------------------------------------------------------------------


def detect_format(name: str, text: str) -> FileFormat:
    """csv or jsonl from the file name, else from the first character (`{` starts a JSON line)."""
    lowered = name.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def _records(text: str, file_format: FileFormat) -> Iterator[tuple[int, dict[str, Any]] | Problem]:
    """(line, fields) per record, or a Problem for a line that is not a record at all."""
    if file_format == "jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                yield Problem(number, "(line)", "not valid JSON")
                continue
            if isinstance(value, dict):
                yield number, value
            else:
                yield Problem(number, "(line)", "not a JSON object")
        return
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    unknown = [name for name in reader.fieldnames or () if name not in FIELDS]
    for name in unknown:
        yield Problem(1, name or "(empty)", f"unknown column; the columns are {', '.join(FIELDS)}")
    try:
        for record in reader:
            # where the record began: a quoted value may span lines, and blank lines are skipped
            start = reader.line_num - sum(v.count("\n") for v in record.values() if isinstance(v, str))
            if None in record:
                yield Problem(start, "(line)", "more values than columns")
            elif any(v is not None and v != "" for v in record.values()):
                yield start, {k: v for k, v in record.items() if k in FIELDS and v is not None}
    except csv.Error:
        yield Problem(reader.line_num, "(line)", "not valid CSV (an unterminated quote?)")


# --- checking one row ---------------------------------------------------------------------------------------


def _text(fields: dict[str, Any], name: str, line: int, problems: list[Problem]) -> str:
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        problems.append(Problem(line, name, "must be a string"))
        return ""
    return value.strip()


def _expiry(raw: str, policy: PolicySettings, now: datetime, line: int,
            problems: list[Problem]) -> tuple[datetime | None, bool]:
    """The expiry a row gets: its own, capped by policy.max_expiry_days; the policy default when empty."""
    cap = now + timedelta(days=policy.max_expiry_days)
    if not raw:
        return now + timedelta(days=policy.default_expiry_days), False
    if raw == "never":
        if policy.allow_never_expires:
            return None, False
        return cap, True
    try:
        when = datetime.fromisoformat(raw) if "T" in raw or " " in raw else datetime.combine(
            date.fromisoformat(raw), datetime.min.time())
    except ValueError:
        problems.append(Problem(line, "expires_at", "not an ISO 8601 date or time (e.g. 2027-01-31T00:00:00Z)"))
        return None, False
    when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)  # a bare date or time is UTC
    if when <= now:
        problems.append(Problem(line, "expires_at", "is in the past"))
    return (cap, True) if when > cap else (when, False)


def _check_secret(row: Row, fields: dict[str, Any], problems: list[Problem]) -> None:
    line = row.line
    key, hashed = _text(fields, "key", line, problems), _text(fields, "hash", line, problems)
    scheme = _text(fields, "scheme", line, problems).lower()
    if key and hashed:
        problems.append(Problem(line, "key", "give the plaintext key or its hash, not both"))
        return
    if not key and not hashed:
        problems.append(Problem(line, "key", "give the plaintext key, or hash and scheme"))
        return
    if key:
        if scheme:
            problems.append(Problem(line, "scheme", "only with hash"))
        if not formats.is_legacy_token(key):
            problems.append(Problem(line, "key", _key_shape(key)))
        row.key = key
        return
    problem = legacy.hash_problem(scheme, hashed)
    if problem:
        problems.append(Problem(line, "scheme" if scheme not in legacy.SCHEMES else "hash", problem))
        return
    found = next(s for s in legacy.SCHEMES if s == scheme)
    if row.kind == "token" and found not in legacy.TOKEN_SCHEMES:
        problems.append(Problem(line, "scheme", f"{found} hashes are salted: a bare token cannot be found by one "
                                "without a slow hash per row; import the plaintext key, or a key pair with its "
                                "client_id"))
        return
    row.scheme, row.legacy_hash = found, legacy.normalise_hash(found, hashed)


def _key_shape(value: str) -> str:
    if value[:2].lower() == "cg" and value[3:4] == "_":
        return "credgate-format keys (cg?_) are never imported"
    return (f"must be {formats.LEGACY_MIN_LENGTH} to {formats.LEGACY_MAX_LENGTH} visible ASCII characters "
            "(no spaces)")


def check_row(line: int, fields: dict[str, Any], policy: PolicySettings, now: datetime,
              problems: list[Problem]) -> Row | None:
    """The row when its fields are right (the database checks come later); problems are appended."""
    before = len(problems)
    for name in fields:
        if name not in FIELDS:
            problems.append(Problem(line, name, f"unknown field; the fields are {', '.join(FIELDS)}"))
    values = {name: _text(fields, name, line, problems) for name in ("owner", "name", "kind", "expires_at",
                                                                       "client_id")}
    for name in _REQUIRED:
        if not values[name]:
            problems.append(Problem(line, name, "required"))
    if len(values["name"]) > _MAX_NAME:
        problems.append(Problem(line, "name", f"at most {_MAX_NAME} characters"))
    kind = values["kind"]
    if kind and kind not in ("token", "key"):
        problems.append(Problem(line, "kind", "must be token or key"))
    expires_at, capped = _expiry(values["expires_at"], policy, now, line, problems)
    row = Row(line, values["owner"], values["name"], "key" if kind == "key" else "token", expires_at, capped)
    if kind == "key":
        if not values["client_id"]:
            problems.append(Problem(line, "client_id", "required for a key pair"))
        elif not formats.is_legacy_client_id(values["client_id"]):
            problems.append(Problem(line, "client_id", f"must be 1 to {formats.LEGACY_CLIENT_ID_MAX_LENGTH} visible "
                                    "ASCII characters without ':', and not credgate-format (cg?_)"))
        row.client_id = values["client_id"]
    elif values["client_id"]:
        problems.append(Problem(line, "client_id", "only for key pairs (kind key)"))
    _check_secret(row, fields, problems)
    return row if len(problems) == before else None


def _lookups(row: Row, server_key: bytes) -> list[str]:
    """Where the gateway will find the row ([0], written) and the keys that would collide with it."""
    if row.kind == "key":
        return [legacy.client_lookup(row.client_id)]
    if row.scheme is not None:
        return [legacy.hash_lookup(row.scheme, row.legacy_hash)]
    return [legacy.token_lookup(server_key, row.key), *legacy.unsalted_lookups(row.key)]


# --- the whole file -----------------------------------------------------------------------------------------


def parse(text: str, file_format: FileFormat, policy: PolicySettings, server_key: bytes,
          now: datetime | None = None) -> tuple[list[Row], list[Problem]]:
    """Every row that passed, and every problem (by line); duplicates within the file are problems too."""
    now = now or datetime.now(UTC)
    rows: list[Row] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for item in _records(text, file_format):
        if isinstance(item, Problem):
            problems.append(item)
            continue
        row = check_row(*item, policy, now, problems)
        if row is None:
            continue
        row.lookups = _lookups(row, server_key)
        first = next((seen[k] for k in row.lookups if k in seen), None)
        if first is not None:
            problems.append(Problem(row.line, "client_id" if row.kind == "key" else "key",
                                    f"the same key as line {first}"))
            continue
        seen.update(dict.fromkeys(row.lookups, row.line))
        rows.append(row)
    return rows, problems


async def _database_problems(conn: Connection, rows: list[Row]) -> list[Problem]:
    """Owners that do not exist, keys imported already."""
    problems: list[Problem] = []
    owners = {r["name"]: r["id"] for r in await conn.fetch(legacy.OWNERS_BY_NAME, sorted({r.owner for r in rows}))}
    taken = {r["lookup"] for r in await conn.fetch(legacy.TAKEN_LOOKUPS, [k for r in rows for k in r.lookups])}
    for row in rows:
        if row.owner not in owners:
            problems.append(Problem(row.line, "owner", "no such user or service account"))
        if taken.intersection(row.lookups):
            problems.append(Problem(row.line, "client_id" if row.kind == "key" else "key", "imported already"))
    return problems


def _hash_plaintext(rows: Iterable[Row], settings: Argon2Settings) -> None:
    """argon2id for every plaintext key, in threads (argon2-cffi releases the GIL); the plaintext is dropped."""
    hasher = hashing.hasher_from(settings)
    todo = [r for r in rows if r.key]
    workers = max(1, min(16, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="import-argon2") as pool:
        for row, hashed in zip(todo, pool.map(lambda r: hashing.hash_secret(hasher, r.key), todo), strict=True):
            row.secret_hash, row.key = hashed, ""


async def import_credentials(pool: Pool, actor: Actor, policy: PolicySettings, argon2: Argon2Settings,
                             server_key: bytes, text: str, file_format: FileFormat, *,
                             dry_run: bool = False) -> ImportReport:
    """Check every row (file and database); unless a dry run and only without problems, write all in one go."""
    started = time.perf_counter()
    report = ImportReport(dry_run=dry_run)
    rows, report.problems = parse(text, file_format, policy, server_key)
    report.rows = len(rows) + len({p.line for p in report.problems})
    async with pool.acquire() as conn:
        if rows:
            report.problems += await _database_problems(conn, rows)
        report.problems.sort(key=lambda p: p.line)
        report.capped = sum(r.capped for r in rows)
        for row in rows:
            report.by_format[row.source] = report.by_format.get(row.source, 0) + 1
        if dry_run or report.problems or not rows:
            report.seconds = time.perf_counter() - started
            return report
        await asyncio.to_thread(_hash_plaintext, rows, argon2)
        for row in rows:
            row.public_id = formats.new_public_id()
            if row.scheme is not None:
                row.secret_hash = legacy.stored_form(row.scheme, row.legacy_hash)
        async with conn.transaction():
            await _write(conn, actor, rows)
    report.imported = len(rows)
    report.ids = [r.public_id for r in rows]
    report.seconds = time.perf_counter() - started
    return report


async def _write(conn: Connection, actor: Actor, rows: list[Row]) -> None:
    owners = {r["name"]: r["id"] for r in await conn.fetch(legacy.OWNERS_BY_NAME, sorted({r.owner for r in rows}))}
    await conn.execute(legacy.INSERT_IMPORTED, [r.public_id for r in rows], [r.kind for r in rows],
                       [r.secret_hash for r in rows], [r.name for r in rows], [owners[r.owner] for r in rows],
                       [r.expires_at for r in rows], list(range(len(rows))), actor.label)
    await conn.execute(legacy.INSERT_LOOKUPS, [r.lookups[0] for r in rows], [r.public_id for r in rows])
    for row in rows:
        await write_audit(conn, actor, "credential.import", "credential", row.public_id,
                          {"kind": row.kind, "name": row.name, "owner": row.owner, "expires_at": row.expires_at,
                           "format": row.source, "expiry_capped": row.capped})
