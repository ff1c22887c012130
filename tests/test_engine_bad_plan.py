"""A bad plan stops the vLLM engine at start-up with the plan's message, leaving no process behind.

The engine is started in a child process of its own process group, with the plan handed straight
to the engine (no pre-check in the API process), so the check inside the engine is what fires.
Afterwards the whole group must be gone: vLLM's engine core and worker are in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from engine_util import ROOT

pytestmark = pytest.mark.engine

SMOL = {"architecture": "LlamaForCausalLM", "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64}
# Two engine starts (~30 s each): the geometry check against the model vLLM builds, and a file
# that does not load. An unknown pattern fails in the same loader as corrupt JSON; it is covered
# without an engine in test_plugin_registration.
BAD = {
    "heads": ({"model": {**SMOL, "num_heads": 12, "num_kv_heads": 4}},
              "$.model.num_heads: expected 9 (num_heads of model"),
    "json": ('{"model": {"num_layers": 30,,}', "$: expected valid JSON, found Expecting property name"),
}

CHILD = textwrap.dedent("""
    import sys
    if __name__ == "__main__":
        import vllm
        from headwise.server.commands.model import resolve_model
        from headwise.server.plugin import engine_args
        for plan in sys.argv[1:]:
            try:
                vllm.LLM(resolve_model(None), **engine_args(plan, enforce_eager=True, max_model_len=1024))
            except Exception as exc:
                print("REFUSED", plan, type(exc).__name__, flush=True)
            else:
                print("STARTED", plan, flush=True)
""")


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    found = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def _group_alive(pgid: int, grace_s: float = 10.0) -> bool:
    """Whether anything of the group still runs after ``grace_s`` (exiting children are reaped
    by init a moment after their parent is gone)."""
    deadline = time.monotonic() + grace_s
    while _group_members(pgid):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.5)
    return False


def test_engine_refuses_bad_plans_and_leaves_nothing_running(tmp_path):
    plans = []
    for name, (doc, _) in BAD.items():
        p = tmp_path / f"{name}.json"
        p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        plans.append(str(p))
    script = tmp_path / "start.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWISE_")}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    proc = subprocess.Popen([sys.executable, str(script), *plans], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=600)  # vLLM logs (the workers' errors too) go to stdout
        left_behind = _group_alive(proc.pid)
    finally:
        if _group_members(proc.pid):
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, out[-3000:]
    for plan in plans:
        assert f"REFUSED {plan}" in out, out[-3000:]
    for (name, (_, message)), plan in zip(BAD.items(), plans):
        assert f"PlanError: {plan}:" in out and message in out, f"{name}: {message!r} not in the engine's log"
    assert not left_behind, "engine processes outlived the failed start"
