"""The compose deployment: valid against the published compose-spec schema (and `docker compose config` where
a compose binary can run it without an engine), and right in what the schema cannot see: dependencies exist,
mounted files exist, migrate runs before the credgate services, only nginx is public, the admin service and
the dashboards stay on 127.0.0.1, and only the gateway reaches the upstream."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import check_jsonschema
import jsonschema
import pytest
import yaml

from tests.test_deploy import _fetch_promtool

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
# The published compose specification's schema, as check-jsonschema (a dev dependency) vendors it with its licence.
SCHEMA = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
RULES = ROOT / "deploy" / "prometheus" / "credgate-rules.yml"
CREDGATE_SERVICES = ("migrate", "gateway", "admin")
LOOPBACK = "127.0.0.1"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, and $$ for a literal $
INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(value: Any, env: dict[str, str], missing: set[str]) -> Any:
    """Compose's variable substitution, enough for this file; required variables absent from env are noted."""
    if isinstance(value, dict):
        return {key: interpolate(item, env, missing) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env, missing) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        present = env.get(name)
        if op in (":-", "-"):
            return present if present is not None and (present or op == "-") else arg
        if present is None:
            missing.add(name)
            return ""
        return present

    return INTERPOLATION.sub(substitute, value)


def load_compose() -> dict[str, Any]:
    missing: set[str] = set()
    model = interpolate(yaml.safe_load(COMPOSE.read_text()), env_example(), missing)
    assert not missing, f"compose.yaml needs {sorted(missing)}, which .env.example does not list"
    assert isinstance(model, dict)
    return model


def test_valid_against_the_compose_spec_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(load_compose())]
    assert not errors, "\n".join(errors)


def _compose_command() -> list[str] | None:
    """`docker compose` or a v2 `docker-compose`, when one is installed (neither needs an engine for config)."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        done = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and not done.stdout.strip().startswith("1."):
            return command
    return None


def test_docker_compose_config_accepts_it() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no compose v2 binary here (docker compose / docker-compose); the schema test covers it")
    done = subprocess.run([*command, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_dependencies_exist_and_migrate_runs_first() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on {dependency}, which is not a service"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["restart"] == "no"
    for name in ("gateway", "admin"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", f"{name} must wait for migrate to succeed"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["gateway"]["deploy"]["replicas"] == 2


def test_every_mounted_file_exists() -> None:
    services = load_compose()["services"]
    checked = 0
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name} mounts {source}, which does not exist"
                checked += 1
        build = service.get("build")
        if build:
            context = COMPOSE_DIR / build["context"]
            assert (context / build["dockerfile"]).is_file(), f"{name}: no Dockerfile at {build['dockerfile']}"
    assert checked >= 5
    # the rules Prometheus loads and the dashboard Grafana provisions are the ones the repository maintains
    prometheus = " ".join(services["prometheus"]["volumes"])
    assert "../prometheus/credgate-rules.yml:" in prometheus
    assert "../grafana/credgate-dashboard.json:" in " ".join(services["grafana"]["volumes"])


def _published(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host interface, host port) of every published port; an interface left out means every interface."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append((port.get("host_ip", ""), str(port.get("published", ""))))
            continue
        parts = str(port).split(":")
        found.append((parts[0] if len(parts) == 3 else "", parts[-2] if len(parts) > 1 else ""))
    return found


def test_only_nginx_is_public_and_admin_stays_on_loopback() -> None:
    services = load_compose()["services"]
    public = [name for name, s in services.items() for interface, _ in _published(s) if interface != LOOPBACK]
    assert public == ["nginx"], f"published on every interface: {public}; only nginx may be"
    assert "ports" not in services["gateway"], "clients reach the gateways only through nginx"
    assert _published(services["admin"]) and all(i == LOOPBACK for i, _ in _published(services["admin"]))
    nginx_conf = (COMPOSE_DIR / "nginx.conf").read_text()
    assert re.search(r"server\s+gateway:8080\b", nginx_conf), "nginx must proxy to the gateway service"


def test_networks_isolate_backend_and_upstreams() -> None:
    model = load_compose()
    services, networks = model["services"], model["networks"]
    members = {net: sorted(n for n, s in services.items() if net in s.get("networks", [])) for net in networks}
    assert networks["backend"]["internal"] is True and networks["upstreams"]["internal"] is True
    assert members["upstreams"] == ["gateway", "upstream"], "only the gateway may reach the upstream"
    # The gateway trusts X-Forwarded-* from nginx: its address lies in the backend subnet credgate.toml trusts.
    subnet = networks["backend"]["ipam"]["config"][0]["subnet"]
    config = tomllib.loads((COMPOSE_DIR / "credgate.toml").read_text())
    assert config["gateway"]["trusted_proxies"] == [subnet]
    assert "nginx" in members["backend"]
    for route in config["routes"]:
        host = re.match(r"https?://([^:/]+)", route["upstream"])
        assert host and host.group(1) in members["upstreams"], route


def test_credgate_services_are_hardened_and_get_secrets_from_the_environment() -> None:
    raw = COMPOSE.read_text()
    services = load_compose()["services"]
    for name in (*CREDGATE_SERVICES, "upstream"):
        service = services[name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert service["user"].split(":")[0] != "0", name
        assert "no-new-privileges:true" in service["security_opt"], name
    for name in CREDGATE_SERVICES:
        environment = services[name]["environment"]
        assert "CREDGATE_SECRET_KEY" in environment and "CREDGATE_DATABASE_URL" in environment, name
    # no secret literal in the committed file: every password is a required ${VARIABLE}
    for variable in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "CREDGATE_SECRET_KEY", "GRAFANA_ADMIN_PASSWORD"):
        assert f"${{{variable}:?" in raw, f"{variable} must be a required variable, not a value"
    # every image pinned to a release, never `latest`
    for name, service in services.items():
        image = service["image"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{name}: {image} is not pinned"


def test_real_env_file_is_git_ignored() -> None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", "deploy/compose/.env"], cwd=ROOT, timeout=30)
    assert done.returncode == 0, "deploy/compose/.env holds the real secrets: add it to .gitignore"


def test_prometheus_config_passes_promtool_and_scrapes_the_rules_jobs(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    config = COMPOSE_DIR / "prometheus.yml"
    scraped = {job["job_name"] for job in yaml.safe_load(config.read_text())["scrape_configs"]}
    assert set(re.findall(r'job="([^"]+)"', RULES.read_text())) <= scraped
    promtool = shutil.which("promtool")
    if promtool is None:
        # the pytest cache keeps the unpacked binary between runs, as for tests/test_deploy.py
        cache = getattr(request.config, "cache", None)
        where = Path(cache.mkdir("promtool")) if cache is not None else tmp_path / "promtool"
        where.mkdir(exist_ok=True)
        fetched = _fetch_promtool(where)
        if fetched is None:
            pytest.skip("promtool is not installed and could not be fetched: apt-get install -y prometheus")
        promtool = str(fetched)
    # laid out as in the container: the rules beside the config
    shutil.copy(config, tmp_path / "prometheus.yml")
    shutil.copy(RULES, tmp_path / "credgate-rules.yml")
    done = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
