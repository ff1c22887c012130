"""Smoke test of bench/hf_memory.py --quick: each configuration runs in its own process through the
real attention functions and the JSON records a peak per configuration (no figure is asserted
beyond what must hold: the output itself is part of every call's peak)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_hf_memory_quick_writes_results(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "hf_memory.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((tmp_path / "hf_memory_quick.json").read_text())
    assert res["complete"] and [r["config"] for r in res["rows"]] == ["sdpa", "profiled", "a_shape"]
    for r in res["rows"]:
        # a fresh 4K x 9 x 64 fp32 output is allocated (and touched) inside every call
        assert r["extra_bytes"] >= 0.9 * r["output_bytes"] > 0, r


def test_hf_memory_refuses_an_unknown_plan(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "hf_memory.py"), "--plans", "nope",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "no shipped plan named nope" in run.stderr


def test_hf_memory_profiler_quick_scores_one_layer(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "hf_memory.py"), "--profiler", "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((tmp_path / "hf_memory_profiler_quick.json").read_text())
    assert res["complete"] and [r["length"] for r in res["rows"]] == [4096]
    r = res["rows"][0]
    assert r["candidates"] > 1, r
    # the sampled rows' probabilities (fp32) and their prefix sums (fp64) are alive together: 4 blocks
    # of 64 rows, 9 heads, 4096 keys
    assert r["extra_bytes"] >= 0.9 * 9 * 256 * 4096 * (4 + 8), r
