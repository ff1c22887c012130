"""`headwise serve` as users run it: start-up failures exit non-zero with the reason, leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headwise.server.commands.serve_process import free_port, live_group_members

ROOT = Path(__file__).resolve().parents[1]
LLAMA_PLAN = ROOT / "configs" / "llama-3.1-8b.json"


def _serve(args: list[str], timeout_s: float) -> tuple[int, str, bool]:
    """Run `headwise serve ARGS` in its own process group; (exit status, output, group left behind)."""
    cmd = [sys.executable, "-m", "headwise.server.commands.cli", "serve", *args,
           "--host", "127.0.0.1", "--port", str(free_port())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"headwise serve {' '.join(args)} did not exit within {timeout_s}s:\n{out[-3000:]}")
    # vLLM's engine processes finish their own shutdown a moment after the API process exits
    deadline = time.monotonic() + 15
    while live_group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = live_group_members(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, bool(left)


def test_a_plan_for_another_model_stops_before_any_engine_starts():
    code, out, left = _serve(["--plan", str(LLAMA_PLAN)], timeout_s=180)
    assert code == 2, out[-2000:]
    assert "headwise serve: error: plan" in out and "num_layers: expected 30" in out
    assert "EngineCore" not in out  # refused before vLLM was asked for anything
    assert not left


@pytest.mark.engine
def test_an_engine_that_fails_to_start_exits_1_with_the_reason_and_leaves_no_process():
    # A KV cache too small for one block: the engine refuses after loading the model. (Asking for
    # more memory than the machine has is not deterministic: it depends on the NUMA reading.)
    code, out, left = _serve(["--kv-cache-memory-bytes", "1"], timeout_s=300)
    assert code == 1, out[-2000:]
    assert "headwise serve: the server failed to start" in out
    assert "No available memory for the cache blocks" in out  # vLLM's own root cause is in the output
    assert not left, "engine or worker processes outlived a failed start"
