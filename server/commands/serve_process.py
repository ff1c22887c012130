"""``headwise serve`` as a child process: start it, wait until it answers, stop all of it.

Used by ``headwise loadtest`` (when no ``--host`` is given), by the tests and by benchmarks. A
vLLM server is several processes: ``headwise serve`` (the supervisor, see ``supervise.py``), the
API server in a process group of its own, the engine core and workers. The child is started in a
session of its own, so every one of them can be found by session id: stopping it sends SIGTERM
to ``headwise serve`` first (it forwards it; vLLM shuts down cleanly), then SIGKILL to every
process of the session still there after a grace period.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; a tiny race is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def live_group_members(pgid: int) -> list[int]:
    """PIDs in process group ``pgid`` *or session* ``pgid`` that are not zombies.

    A process started with ``start_new_session`` leads a session and a group of the same id;
    ``headwise serve`` puts the API server in a group of its own inside that session, so the
    session is what holds all of a server. (An exited child that nobody has reaped yet still
    answers ``killpg(pgid, 0)`` but holds no memory and runs nothing: zombies do not count.)
    """
    import psutil

    members = []
    for p in psutil.process_iter(["status"]):
        try:
            if pgid in (os.getpgid(p.pid), os.getsid(p.pid)) and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return members


def kill_members(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every live process of group or session ``pgid`` (see ``live_group_members``)."""
    for pid in live_group_members(pgid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue


class ServerProcess:
    """``headwise serve ARGS --host HOST --port PORT`` in its own process group, output to a log file.

    >>> with ServerProcess(["--no-headwise"], log_path="serve.log") as server:
    ...     print(server.base_url)  # http://127.0.0.1:PORT/v1
    """

    def __init__(self, args: list[str], *, host: str = "127.0.0.1", port: int | None = None,
                 env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None):
        self.args = list(args)
        self.host = host
        self.port = port or free_port(host)
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else Path(os.devnull)
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "headwise.server.commands.cli", "serve", *self.args,
                "--host", self.host, "--port", str(self.port)]

    def start(self, timeout_s: float = 300.0) -> "ServerProcess":
        """Start and wait until ``/health`` answers 200; raise ``ServerStartError`` (and stop it) if the
        process exits first or ``timeout_s`` passes."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise ServerStartError(f"headwise serve exited with status {code} before it was healthy; "
                                       f"log tail:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise ServerStartError(f"headwise serve was not healthy after {timeout_s:.0f}s; log tail:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_text(self) -> str:
        if self.log_path == Path(os.devnull) or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def group_alive(self) -> bool:
        """Whether any process of the server's process group is still running."""
        return self.proc is not None and bool(live_group_members(self.proc.pid))

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM ``headwise serve`` (it stops the rest), then SIGKILL whatever of the session is left
        after ``grace_s``."""
        if self.proc is None:
            return
        sid = self.proc.pid  # start_new_session: the child leads its own session and group
        try:
            os.killpg(sid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.group_alive():
            self.proc.poll()  # reap the leader so the group can empty
            time.sleep(0.2)
        if self.group_alive():
            kill_members(sid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
