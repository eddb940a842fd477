"""The sections of the settings file ([gateway], [cache], [argon2], ...): typed, frozen, with their defaults.

gateway.core.settings assembles them into `Settings` and validates them; the annotated example config
(config/credgate.example.toml) says why each default is what it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from gateway.core.redaction import Secret


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
class ForwardAuthSettings:
    listen: str = ""  # off by default; e.g. "127.0.0.1:8082": never the public listener
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")  # anyone else: 403, nothing decided


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    assertion: bool = False  # sign Credgate-Identity on every route (a route's identity_assertion overrides)
    key_files: tuple[str, ...] = ()  # Ed25519 PEM files; the first signs, all are published in the JWKS
    ttl: int = 60  # seconds an assertion is valid
    issuer: str = ""  # the `iss` claim; "" = http://<gateway.listen>


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    urls: tuple[str, ...] = ()  # every lifecycle event goes here; owners may add their own (users' webhook_url)
    secret: Secret = field(default_factory=lambda: Secret(""))  # signs each delivery (HMAC-SHA256)
    timeout: float = 5.0  # seconds per delivery attempt
    retry_for: float = 86400.0  # seconds of retries with exponential backoff before a delivery is marked failed
    expiry_scan_seconds: float = 300.0  # how often expiring (14, 7, 1 days) and expired credentials are looked for


@dataclass(frozen=True, slots=True)
class LeakSettings:
    path: str = ""  # the secret-scanning partner endpoint on the gateway's public listener; "" = off
    public_keys_file: str = ""  # the code host's signing keys (its JSON format), or:
    public_keys_url: str = ""  # fetched and cached; e.g. https://api.github.com/meta/public_keys/secret_scanning


@dataclass(frozen=True, slots=True)
class AuditSettings:
    verify_seconds: float = 300.0  # how often the admin service re-verifies the audit hash chain
