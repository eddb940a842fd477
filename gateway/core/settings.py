"""Typed, frozen settings: a TOML file, environment overrides for scalars, every error reported at once."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.core.redaction import Secret, SecretURL, redact_url
from gateway.core.redis_client import url_problem as redis_url_problem
from gateway.core.route_config import Route, build_routes

ENV_PREFIX = "CREDGATE_"


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 32768
    max_headers: int = 100
    max_request_line: int = 8192
    max_body_bytes: int = 100 * 1024 * 1024
    head_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 60.0
    upstream_idle: float = 30.0


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    user_id: str = "X-Auth-User-Id"
    user: str = "X-Auth-User"
    groups: str = "X-Auth-Groups"
    credential_id: str = "X-Auth-Credential-Id"
    credential_name: str = "X-Auth-Credential-Name"
    method: str = "X-Auth-Method"
    scope: str = "X-Auth-Scope"

    def names(self) -> tuple[str, ...]:
        """Every identity header name, in the order the upstream receives them."""
        return dataclasses.astuple(self)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    listen: str = "127.0.0.1:8080"
    workers: int = 1
    metrics_listen: str = "127.0.0.1:9100"
    trusted_proxies: tuple[str, ...] = ()
    access_key_header: str = "accessKey"
    secret_key_header: str = "secretKey"
    keep_credential_headers: bool = False
    access_log: str = "stdout"
    expiry_warning_days: int = 14
    shutdown_timeout: float = 10.0
    usage_flush_seconds: float = 5.0
    limits: Limits = field(default_factory=Limits)
    identity_headers: IdentityHeaders = field(default_factory=IdentityHeaders)


@dataclass(frozen=True, slots=True)
class CacheSettings:
    memory_ttl: float = 60.0
    redis_ttl: float = 300.0
    negative_ttl: float = 5.0
    stale_ttl: float = 300.0
    max_entries: int = 1_000_000
    store_timeout: float = 1.5  # one credential read from Postgres on the request path (pool wait + query)
    redis_timeout: float = 0.5  # one Redis call on the request path


@dataclass(frozen=True, slots=True)
class Argon2Settings:
    memory_kib: int = 19456
    time_cost: int = 2
    parallelism: int = 1
    concurrency: int = 2
    queue_limit: int = 64


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    max_failures: int = 10  # per credential id and client address
    per_address_max_failures: int = 50
    per_id_max_failures: int = 100  # per credential id, over every address
    window_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    on_redis_down: str = "local"  # "local": each process enforces its share from memory; "allow"; "deny"


@dataclass(frozen=True, slots=True)
class PolicySettings:
    default_expiry_days: int = 90
    max_expiry_days: int = 365
    allow_never_expires: bool = False


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: str = "127.0.0.1:8081"
    metrics_listen: str = "127.0.0.1:9101"
    session_ttl: float = 8 * 3600.0
    max_body_bytes: int = 1024 * 1024
    login_max_failures: int = 5
    login_window_seconds: float = 300.0
    access_log: str = "stdout"
    store_timeout: float = 5.0  # a request's wait on Postgres before 503
    gateway_url: str = ""  # the gateway as API clients reach it (UI usage examples); "" = http://<gateway.listen>


@dataclass(frozen=True, slots=True)
class OAuthSettings:
    token_path: str = "/oauth/token"
    revoke_path: str = "/oauth/revoke"
    introspect_path: str = "/oauth/introspect"
    access_token_ttl: int = 3600
    signing_key_id: str = "k1"
    previous_signing_keys: tuple[str, ...] = ()
    issuer: str = ""


@dataclass(frozen=True, slots=True)
class Settings:
    secret_key: Secret = field(default_factory=lambda: Secret(""))
    secret_key_file: str = ""
    database_url: SecretURL = field(default_factory=lambda: SecretURL(""))
    redis_url: SecretURL = field(default_factory=lambda: SecretURL(""))
    database_pool_size: int = 10
    data_dir: str = ".credgate"
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    argon2: Argon2Settings = field(default_factory=Argon2Settings)
    throttle: ThrottleSettings = field(default_factory=ThrottleSettings)
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    oauth: OAuthSettings = field(default_factory=OAuthSettings)
    routes: tuple[Route, ...] = ()

    @property
    def secret_key_bytes(self) -> bytes:
        return self.secret_key.reveal().encode()

    @property
    def gateway_url(self) -> str:
        """Where API clients reach the gateway: admin.gateway_url, else http://<gateway.listen>."""
        return self.admin.gateway_url.rstrip("/") or f"http://{self.gateway.listen}"


class SettingsError(Exception):
    """Every problem found in a configuration, each naming the key and the fix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

    def report(self) -> str:
        lines = [f"credgate: configuration has {len(self.problems)} problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def load_settings(path: str | Path | None = None, env: typing.Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (path, else $CREDGATE_CONFIG, else none), apply the environment, validate."""
    env = os.environ if env is None else env
    problems: list[str] = []
    raw: dict[str, Any] = {}
    path = path or env.get(ENV_PREFIX + "CONFIG") or None
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            problems.append(f"config file {path}: not found; pass an existing file with --config or CREDGATE_CONFIG")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"config file {path}: cannot be read ({exc.__class__.__name__})")
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"config file {path}: not valid TOML ({exc}); fix the syntax at that line")
    raw_routes = raw.pop("routes", [])
    settings: Settings = _build(Settings, raw, "", env, problems)
    routes = build_routes(raw_routes, problems)
    settings = dataclasses.replace(settings, routes=tuple(routes))
    if not settings.secret_key and settings.secret_key_file:
        try:
            key = Path(settings.secret_key_file).read_text(encoding="utf-8").strip()
            settings = dataclasses.replace(settings, secret_key=Secret(key))
        except OSError as exc:
            problems.append(
                f"secret_key_file: {settings.secret_key_file} cannot be read ({exc.strerror}); "
                "create it or set CREDGATE_SECRET_KEY"
            )
    _validate(settings, problems)
    if problems:
        raise SettingsError(problems)
    return settings


def _build(cls: type[Any], raw: Any, prefix: str, env: typing.Mapping[str, str], problems: list[str]) -> Any:
    """Construct dataclass `cls` from a TOML table, checking types and unknown keys, env overriding scalars."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'top level'}: expected a table, got {type(raw).__name__}")
        raw = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "routes"}
    for key in raw:
        if key not in fields:
            near = [n for n in fields if n.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {near[0]}?)" if near else ""
            problems.append(f"{prefix}{key}: unknown key{hint}; remove it or check the spelling")
    values: dict[str, Any] = {}
    for name in fields:
        kind = hints[name]
        dotted = f"{prefix}{name}"
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw.get(name, {}), dotted + ".", env, problems)
            continue
        env_name = ENV_PREFIX + dotted.replace(".", "_").upper()
        if env_name in env:
            value = _from_env(env[env_name], kind, env_name, problems)
        elif name in raw:
            value = _check_type(raw[name], kind, dotted, problems)
        else:
            continue
        if value is not None:
            values[name] = value
    return cls(**values)


def _from_env(text: str, kind: Any, name: str, problems: list[str]) -> Any:
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("1", "true", "yes", "on")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind in (str, Secret, SecretURL):
            return kind(text)
        if typing.get_origin(kind) is tuple:
            return tuple(item.strip() for item in text.split(",") if item.strip())
    except ValueError:
        problems.append(f"{name}: {_type_name(kind)} expected; set the environment variable to one")
        return None
    problems.append(f"{name}: cannot be set from the environment; set it in the config file")
    return None


def _check_type(value: Any, kind: Any, key: str, problems: list[str]) -> Any:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind in (str, Secret, SecretURL):
        ok = isinstance(value, str)
        value = kind(value) if ok and kind is not str else value
    elif typing.get_origin(kind) is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported settings type for {key}: {kind}")
    if not ok:
        shown = "a secret" if kind in (Secret, SecretURL) else repr(value)[:40]
        problems.append(f"{key}: {_type_name(kind)} expected, got {shown}; change the value's type")
        return None
    return value


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return "a list of strings"
    names = {bool: "true or false", int: "an integer", float: "a number"}
    return names.get(kind, "a string")


def parse_listen(value: str) -> tuple[str, int]:
    """Split 'host:port' ('[::1]:80' for IPv6) into its parts; ValueError when malformed."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(value)
    return host.strip("[]"), int(port_text)


def _validate(s: Settings, problems: list[str]) -> None:
    _validate_connections(s, problems)
    _validate_listeners(s, problems)
    _validate_values(s, problems)
    _validate_signing_keys(s.oauth, problems)


def _validate_connections(s: Settings, problems: list[str]) -> None:
    key = s.secret_key.reveal()
    if not key:
        problems.append(
            "secret_key: required; set CREDGATE_SECRET_KEY to 32+ random characters "
            "(python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )
    elif len(key) < 32:
        problems.append("secret_key: too short; use at least 32 random characters")
    db = s.database_url.reveal()
    if not db:
        problems.append("database_url: required; set CREDGATE_DATABASE_URL to postgresql://user@host:port/db")
    elif urlsplit(db).scheme not in ("postgresql", "postgres"):
        problems.append(f"database_url: {redact_url(db)!r} is not a postgresql:// URL")
    redis_url = s.redis_url.reveal()
    if redis_url and (redis_problem := redis_url_problem(redis_url)):
        problems.append(f"redis_url: {redis_problem}")


def _validate_listeners(s: Settings, problems: list[str]) -> None:
    for dotted, value in (
        ("gateway.listen", s.gateway.listen),
        ("gateway.metrics_listen", s.gateway.metrics_listen),
        ("admin.listen", s.admin.listen),
        ("admin.metrics_listen", s.admin.metrics_listen),
    ):
        if value == "" and dotted.endswith("metrics_listen"):
            continue
        try:
            parse_listen(value)
        except ValueError:
            problems.append(f'{dotted}: {value!r} is not host:port, e.g. "127.0.0.1:8080"')
    for proxy in s.gateway.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            problems.append(f"gateway.trusted_proxies: {proxy!r} is not an IP address or CIDR network")


def _validate_values(s: Settings, problems: list[str]) -> None:
    positive: list[tuple[str, float]] = [
        ("gateway.workers", s.gateway.workers),
        ("database_pool_size", s.database_pool_size),
        ("argon2.concurrency", s.argon2.concurrency),
        ("argon2.time_cost", s.argon2.time_cost),
        ("argon2.parallelism", s.argon2.parallelism),
        ("cache.memory_ttl", s.cache.memory_ttl),
        ("cache.redis_ttl", s.cache.redis_ttl),
        ("cache.max_entries", s.cache.max_entries),
        ("cache.store_timeout", s.cache.store_timeout),
        ("cache.redis_timeout", s.cache.redis_timeout),
        ("throttle.max_failures", s.throttle.max_failures),
        ("throttle.per_address_max_failures", s.throttle.per_address_max_failures),
        ("throttle.per_id_max_failures", s.throttle.per_id_max_failures),
        ("admin.store_timeout", s.admin.store_timeout),
        ("throttle.window_seconds", s.throttle.window_seconds),
        ("policy.default_expiry_days", s.policy.default_expiry_days),
        ("policy.max_expiry_days", s.policy.max_expiry_days),
        ("oauth.access_token_ttl", s.oauth.access_token_ttl),
        ("gateway.limits.max_header_bytes", s.gateway.limits.max_header_bytes),
        ("gateway.limits.max_headers", s.gateway.limits.max_headers),
        ("gateway.limits.head_timeout", s.gateway.limits.head_timeout),
    ]
    problems.extend(f"{name}: must be greater than 0" for name, value in positive if value <= 0)
    if s.ratelimit.on_redis_down not in ("local", "allow", "deny"):
        value = s.ratelimit.on_redis_down
        problems.append(f'ratelimit.on_redis_down: "local", "allow" or "deny" expected, got {value!r}')
    if s.argon2.memory_kib < 8 * s.argon2.parallelism:
        problems.append("argon2.memory_kib: must be at least 8 x parallelism (OWASP minimum is 19456)")
    if s.policy.default_expiry_days > s.policy.max_expiry_days > 0:
        problems.append("policy.default_expiry_days: larger than policy.max_expiry_days; lower it or raise the maximum")
    if (
        s.gateway.access_log not in ("stdout", "off")
        and not s.gateway.access_log.startswith("/")
        and not s.gateway.access_log.startswith(".")
    ):
        problems.append('gateway.access_log: "stdout", "off" or a file path (starting with / or .)')
    for dotted, path in (
        ("oauth.token_path", s.oauth.token_path),
        ("oauth.revoke_path", s.oauth.revoke_path),
        ("oauth.introspect_path", s.oauth.introspect_path),
    ):
        if not path.startswith("/"):
            problems.append(f"{dotted}: must start with '/'")


def _validate_signing_keys(oauth: OAuthSettings, problems: list[str]) -> None:
    kid_ok = 1 <= len(oauth.signing_key_id.encode()) <= 64 and ":" not in oauth.signing_key_id
    if not kid_ok:
        problems.append("oauth.signing_key_id: 1-64 bytes without ':' expected, e.g. \"k2\"")
    seen = {oauth.signing_key_id}
    for index, item in enumerate(oauth.previous_signing_keys):
        kid, sep, material = item.partition(":")
        if not sep or not kid or len(kid.encode()) > 64 or len(material) < 32:
            problems.append(
                f'oauth.previous_signing_keys[{index}]: "KEY_ID:SECRET" with a 32+ character secret expected'
            )
        elif kid in seen:
            problems.append(
                f"oauth.previous_signing_keys[{index}]: key id {kid!r} is used twice (or equals "
                "oauth.signing_key_id); give every key its own id"
            )
        seen.add(kid)


def exit_on_error(exc: SettingsError) -> typing.NoReturn:
    """Print every configuration problem to stderr and exit 2 (the CLI's contract for bad config)."""
    print(exc.report(), file=sys.stderr)
    raise SystemExit(2)


__all__ = [
    "AdminSettings",
    "Argon2Settings",
    "CacheSettings",
    "GatewaySettings",
    "IdentityHeaders",
    "Limits",
    "OAuthSettings",
    "PolicySettings",
    "RateLimitSettings",
    "Settings",
    "SettingsError",
    "ThrottleSettings",
    "exit_on_error",
    "load_settings",
    "parse_listen",
]
