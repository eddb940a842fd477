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

from gateway.core.outbox import url_problem as webhook_url_problem
from gateway.core.redaction import Secret, SecretURL, redact_url
from gateway.core.redis_client import url_problem as redis_url_problem
from gateway.core.route_config import Route, build_routes
from gateway.core.sections import (
    AdminSettings,
    Argon2Settings,
    AuditSettings,
    CacheSettings,
    ForwardAuthSettings,
    GatewaySettings,
    IdentityHeaders,
    IdentitySettings,
    LeakSettings,
    Limits,
    OAuthSettings,
    PolicySettings,
    RateLimitSettings,
    ThrottleSettings,
    WebhookSettings,
)

ENV_PREFIX = "CREDGATE_"


@dataclass(frozen=True, slots=True)
class Settings:
    secret_key: Secret = field(default_factory=lambda: Secret(""))
    secret_key_file: str = ""
    database_url: SecretURL = field(default_factory=lambda: SecretURL(""))
    # A direct connection for the LISTEN channel when database_url goes through a transaction-mode pooler.
    database_listen_url: SecretURL = field(default_factory=lambda: SecretURL(""))
    database_statement_cache_size: int = 100  # 0 behind a pooler that cannot keep prepared statements
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
    forward_auth: ForwardAuthSettings = field(default_factory=ForwardAuthSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    leaks: LeakSettings = field(default_factory=LeakSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
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
    listen_db = s.database_listen_url.reveal()
    if listen_db and urlsplit(listen_db).scheme not in ("postgresql", "postgres"):
        problems.append(f"database_listen_url: {redact_url(listen_db)!r} is not a postgresql:// URL")
    if s.database_statement_cache_size < 0:
        problems.append("database_statement_cache_size: 0 (off) or more expected")
    redis_url = s.redis_url.reveal()
    if redis_url and (redis_problem := redis_url_problem(redis_url)):
        problems.append(f"redis_url: {redis_problem}")


def _validate_listeners(s: Settings, problems: list[str]) -> None:
    for dotted, value in (
        ("gateway.listen", s.gateway.listen),
        ("gateway.metrics_listen", s.gateway.metrics_listen),
        ("admin.listen", s.admin.listen),
        ("admin.metrics_listen", s.admin.metrics_listen),
        ("forward_auth.listen", s.forward_auth.listen),
    ):
        if value == "" and (dotted.endswith("metrics_listen") or dotted == "forward_auth.listen"):
            continue
        try:
            parse_listen(value)
        except ValueError:
            problems.append(f'{dotted}: {value!r} is not host:port, e.g. "127.0.0.1:8080"')
    if s.forward_auth.listen and s.forward_auth.listen == s.gateway.listen:
        problems.append("forward_auth.listen: must not be the public listener (gateway.listen); give it its own port")
    for dotted, proxies in (("gateway.trusted_proxies", s.gateway.trusted_proxies),
                            ("forward_auth.trusted_proxies", s.forward_auth.trusted_proxies)):
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                problems.append(f"{dotted}: {proxy!r} is not an IP address or CIDR network")
    if s.identity.ttl <= 0:
        problems.append("identity.ttl: must be greater than 0")
    if (s.identity.assertion or any(r.identity_assertion for r in s.routes)) and not s.identity.key_files:
        problems.append("identity.key_files: signed identity is on but no key is configured; "
                        "create one with `credgate keys generate --out FILE` and list it here")


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
    hooks = s.webhooks  # lifecycle-event webhooks (admin.webhooks): signed, so a URL needs the secret
    problems.extend(f"webhooks.urls: {redact_url(url)!r}: {problem}" for url in hooks.urls
                    if (problem := webhook_url_problem(url)))
    if hooks.urls and not hooks.secret.reveal():
        problems.append("webhooks.secret: required when webhooks.urls is set; prefer CREDGATE_WEBHOOKS_SECRET")
    if min(hooks.timeout, hooks.retry_for, hooks.expiry_scan_seconds) <= 0:
        problems.append("webhooks.timeout, retry_for and expiry_scan_seconds: must be greater than 0")
    leaks = s.leaks  # the secret-scanning endpoint: a path of its own, and keys to check the reports with
    if leaks.path and (not leaks.path.startswith("/") or leaks.path == "/" or not leaks.path.isascii()):
        problems.append('leaks.path: a path starting with "/" expected, e.g. "/_credgate/leaks"; "" turns it off')
    if leaks.path and not (leaks.public_keys_file or leaks.public_keys_url):
        problems.append("leaks.path: set leaks.public_keys_file or leaks.public_keys_url (the code host's keys)")
    if leaks.public_keys_url and not leaks.public_keys_url.startswith(("https://", "http://")):
        problems.append("leaks.public_keys_url: an https:// URL expected")


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
    "AuditSettings",
    "CacheSettings",
    "ForwardAuthSettings",
    "GatewaySettings",
    "IdentityHeaders",
    "IdentitySettings",
    "LeakSettings",
    "Limits",
    "OAuthSettings",
    "PolicySettings",
    "RateLimitSettings",
    "Settings",
    "SettingsError",
    "ThrottleSettings",
    "WebhookSettings",
    "exit_on_error",
    "load_settings",
    "parse_listen",
]
