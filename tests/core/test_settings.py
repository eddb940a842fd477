"""Settings: TOML + environment, every problem reported at once, secrets never shown."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from gateway.core.redaction import Secret, SecretURL
from gateway.core.settings import Settings, SettingsError, load_settings

KEY = "k" * 40
BASE_ENV = {"CREDGATE_SECRET_KEY": KEY, "CREDGATE_DATABASE_URL": "postgresql://u:pw@127.0.0.1:5432/db"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_and_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
redis_url = "redis://127.0.0.1:6379/0"
[gateway]
listen = "0.0.0.0:9999"
trusted_proxies = ["10.0.0.0/8"]
[gateway.limits]
max_body_bytes = 1024
[[routes]]
prefix = "/api/"
upstream = "http://127.0.0.1:9000/base"
groups = ["finance"]
strip_prefix = true
[[routes]]
prefix = "/public"
upstream = "http://127.0.0.1:9001"
auth = "none"
""",
    )
    s = load_settings(path, env=BASE_ENV)
    assert s.gateway.listen == "0.0.0.0:9999"
    assert s.gateway.limits.max_body_bytes == 1024
    assert s.gateway.limits.max_headers == 100
    assert s.policy.default_expiry_days == 90
    assert s.argon2.memory_kib >= 19456 and s.argon2.time_cost >= 2
    assert [r.prefix for r in s.routes] == ["/api", "/public"]
    assert s.routes[0].groups == frozenset({"finance"}) and s.routes[0].strip_prefix
    assert s.routes[0].upstream.base_path == "/base"
    assert not s.routes[1].auth_required


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway]\nworkers = 2\n[cache]\nmemory_ttl = 5\n")
    env = dict(
        BASE_ENV,
        CREDGATE_GATEWAY_WORKERS="4",
        CREDGATE_CACHE_MEMORY_TTL="1.5",
        CREDGATE_GATEWAY_TRUSTED_PROXIES="10.0.0.1, 192.168.0.0/16",
    )
    s = load_settings(path, env=env)
    assert s.gateway.workers == 4
    assert s.cache.memory_ttl == 1.5
    assert s.gateway.trusted_proxies == ("10.0.0.1", "192.168.0.0/16")


def test_config_env_var_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway]\nworkers = 3\n")
    s = load_settings(None, env=dict(BASE_ENV, CREDGATE_CONFIG=str(path)))
    assert s.gateway.workers == 3


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[gateway]
workerz = 2
listen = "nonsense"
[cache]
memory_ttl = "soon"
[[routes]]
prefix = "api"
upstream = "ftp://x"
auth = "maybe"
""",
    )
    with pytest.raises(SettingsError) as info:
        load_settings(path, env={})
    text = str(info.value)
    for needle in (
        "gateway.workerz",
        "gateway.listen",
        "cache.memory_ttl",
        "routes[0].prefix",
        "routes[0].upstream",
        "routes[0].auth",
        "secret_key",
        "database_url",
    ):
        assert needle in text, needle
    assert len(info.value.problems) >= 8


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    env = dict(BASE_ENV, CREDGATE_REDIS_URL="redis://:redispw@127.0.0.1:6379/0")
    s = load_settings(None, env=env)
    shown = repr(s) + str(s)
    assert KEY not in shown
    assert "pw@" not in shown and "redispw" not in shown
    assert s.secret_key.reveal() == KEY
    assert "***" in repr(SecretURL("postgresql://u:pw@h/db"))
    assert repr(Secret("abc")) == "Secret('**********')"


def test_bad_environment_value_named() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(None, env=dict(BASE_ENV, CREDGATE_GATEWAY_WORKERS="many", CREDGATE_SECRET_KEY="tiny-Zq9"))
    text = str(info.value)
    assert "CREDGATE_GATEWAY_WORKERS" in text and "secret_key" in text
    assert "tiny-Zq9" not in text


def test_secret_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    path = write(tmp_path, f'secret_key_file = "{key_file}"\n')
    env = {"CREDGATE_DATABASE_URL": BASE_ENV["CREDGATE_DATABASE_URL"]}
    assert load_settings(path, env=env).secret_key.reveal() == KEY


def test_cli_exits_2_naming_three_mistakes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
secret_key = "a-long-enough-secret-key-for-the-test-0123456789"
database_url = "mysql://nope"
[gateway]
workers = 0
[policy]
max_expiry_days = "ninety"
""",
    )
    env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "admin", "migrate", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "database_url" in proc.stderr and "gateway.workers" in proc.stderr
    assert "policy.max_expiry_days" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "a-long-enough-secret" not in proc.stderr


EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "credgate.example.toml"


def _dotted_fields(cls: type[Any], prefix: str = "") -> list[str]:
    names = []
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            names += _dotted_fields(kind, f"{prefix}{f.name}.")
        elif f.name != "routes":
            names.append(prefix + f.name)
    return names


def test_the_annotated_example_documents_every_setting_and_loads() -> None:
    text = EXAMPLE.read_text()
    sections: dict[str, set[str]] = {}
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            current = stripped.strip("[]") + "."
        elif stripped.startswith("[["):
            current = "routes."
        match = re.match(r"#?\s*([a-z_]+)\s*=", stripped)
        if match:
            sections.setdefault(current, set()).add(match.group(1))
    missing = []
    for name in _dotted_fields(Settings):
        section, _, key = name.rpartition(".")
        if key not in sections.get(section + "." if section else "", set()):
            missing.append(name)
    assert not missing, f"config/credgate.example.toml does not document: {missing}"
    settings = load_settings(EXAMPLE, env={"CREDGATE_SECRET_KEY": "k" * 40})
    assert settings.routes and settings.ratelimit.on_redis_down == "local"
