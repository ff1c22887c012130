"""``headwise serve`` as a thin supervisor above vLLM's API server: when the server dies, nothing stays.

vLLM's engine core and workers do not notice a SIGKILLed API server (the OOM killer's signal):
they keep running as orphans, holding their memory. So ``headwise serve`` does not run vLLM in its
own process. It

* becomes a *child subreaper* (Linux ``PR_SET_CHILD_SUBREAPER``): a server process orphaned by the
  API server's death is re-parented to the supervisor instead of init, so it can always be found;
* starts the API server (``python -m headwise.server.commands.supervise --child ...``, which runs
  vLLM's ``serve`` through ``launch.run_launch``) in a process group of its own, with a parent-death
  signal (``PR_SET_PDEATHSIG`` = SIGTERM: if the supervisor itself is SIGKILLed, vLLM still shuts
  down cleanly);
* forwards SIGTERM / SIGINT / SIGHUP to the API server (vLLM drains and stops its engine), and
  kills what is left if it has not stopped within ``STOP_GRACE_S``;
* when the API server exits, for whatever reason, stops every process still in its group or below
  the supervisor (SIGTERM, then SIGKILL after ``LEFTOVER_GRACE_S``), reaps them, and exits with a
  status and a last stderr line that say why: 0 after a requested stop, the API server's status
  when it failed (its own reason, passed up through a pipe), 128 + signal number when it was killed.

Why a supervisor rather than a parent-death hook inside the engine processes: it covers every
server, ``--no-headwise`` included (the plugin's hook runs only when headwise is switched on), it
needs no change to vLLM's processes, and it also catches the case the engine core itself dies
(vLLM then stops the API server, the supervisor makes sure the workers went too).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from .launch import Launch, run_launch
from .logline import say

STOP_GRACE_S = 60.0  # after a forwarded SIGTERM: how long vLLM may take to drain before it is killed
LEFTOVER_GRACE_S = 3.0  # after the API server exited: how long its processes get between SIGTERM and SIGKILL
KILLED_GRACE_S = 1.0  # the same after the API server was killed by a signal: no clean shutdown is coming
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: the group kill below still runs
        return False


def _die_with_parent(parent: int) -> None:
    """In the API server child, before exec: SIGTERM when the supervisor dies."""
    os.setpgid(0, 0)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def leftovers(pgid: int) -> list:
    """Live (non-zombie) processes in process group ``pgid`` or below this process."""
    import psutil

    found = {}
    for p in psutil.Process().children(recursive=True):
        found[p.pid] = p
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and os.getpgid(p.pid) == pgid:
                found[p.pid] = p
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    live = []
    for p in found.values():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                live.append(p)
        except psutil.NoSuchProcess:
            continue
    return live


def _reap() -> None:
    """Collect the exit status of every adopted orphan that has ended (no zombies left behind)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_leftovers(pgid: int, grace_s: float = LEFTOVER_GRACE_S) -> list[str]:
    """SIGTERM what is left of the server, SIGKILL it after ``grace_s``; returns what was stopped."""
    import psutil

    procs = leftovers(pgid)
    names = []
    for p in procs:
        try:
            names.append(f"{p.name()} (pid {p.pid})")
            p.terminate()
        except psutil.NoSuchProcess:
            continue
    deadline = time.monotonic() + grace_s
    while procs and time.monotonic() < deadline:
        _reap()
        procs = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    deadline = time.monotonic() + 5.0
    while leftovers(pgid) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.05)
    _reap()
    return names


def _child_command(launch: Launch, reason_fd: int) -> list[str]:
    return [sys.executable, "-m", "headwise.server.commands.supervise", "--child", "--reason-fd", str(reason_fd),
            json.dumps(dataclasses.asdict(launch))]


def supervise(launch: Launch) -> int:
    """Run ``launch``'s API server as a child and stand guard over it; returns the exit status."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    read_fd, write_fd = os.pipe()
    me = os.getpid()
    child = subprocess.Popen(_child_command(launch, write_fd), pass_fds=(write_fd,),
                             preexec_fn=lambda: _die_with_parent(me))
    os.close(write_fd)
    asked: list[signal.Signals] = []

    def forward(signum, _frame) -> None:
        sig = signal.Signals(signum)
        if asked and sig == signal.SIGINT:  # a second Ctrl-C: stop now
            os.killpg(child.pid, signal.SIGKILL)
        asked.append(sig)
        try:
            child.send_signal(signal.SIGTERM if sig == signal.SIGHUP else sig)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    kill_at = None
    try:
        while True:
            try:
                status = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if asked and kill_at is None:
                    kill_at = time.monotonic() + STOP_GRACE_S
                if kill_at is not None and time.monotonic() > kill_at:
                    say(f"the server did not stop within {STOP_GRACE_S:.0f}s of {asked[0].name}: killing it")
                    os.killpg(child.pid, signal.SIGKILL)
                    kill_at = float("inf")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    reason = _read_reason(read_fd)
    stopped = stop_leftovers(child.pid, KILLED_GRACE_S if status < 0 and not asked else LEFTOVER_GRACE_S)
    if launch.owned_stats_dir:
        shutil.rmtree(launch.owned_stats_dir, ignore_errors=True)
    return _verdict(status, asked, reason, stopped, child.pid)


def _read_reason(fd: int) -> str:
    chunks = []
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace").strip()


def _verdict(status: int, asked: list[signal.Signals], reason: str, stopped: list[str], pid: int) -> int:
    left = f"; stopped {len(stopped)} leftover server process(es): {', '.join(stopped)}" if stopped else ""
    if asked and status in (0, 130, -signal.SIGTERM, -signal.SIGINT):
        say(f"stopped on {asked[0].name}" + left)
        return 0
    if status < 0:
        sig = signal.Signals(-status)
        why = (" (the kernel's OOM killer sends SIGKILL when memory runs out: see `dmesg`)"
               if sig == signal.SIGKILL else "")
        print(f"headwise serve: the API server process (pid {pid}) was killed by {sig.name}{why}{left}",
              file=sys.stderr, flush=True)
        return 128 + sig.value
    if status == 0:
        print(f"headwise serve: the API server exited on its own without being asked to stop{left}",
              file=sys.stderr, flush=True)
        return 1
    print(f"headwise serve: {reason or f'the API server exited with status {status}'}{left}",
          file=sys.stderr, flush=True)
    return status


# ------------------------------------------------------------------------ the child side
def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="headwise-serve-child")
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--reason-fd", type=int, required=True)
    parser.add_argument("launch")
    args = parser.parse_args(argv)
    launch = Launch(**json.loads(args.launch))
    launch.owned_stats_dir = None  # the supervisor removes it, after every process is gone
    writer = os.fdopen(args.reason_fd, "w")

    def report(reason: str) -> None:
        writer.write(reason + "\n")
        writer.flush()

    try:
        return run_launch(launch, report=report)
    finally:
        writer.close()


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
