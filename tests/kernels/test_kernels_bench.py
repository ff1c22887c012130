"""bench/kernels.py runs: on a machine without CUDA it does its interpreter smoke run and exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_kernels_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--smoke", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "kernels-smoke.json").read_text())
    assert {"device", "torch", "triton"} <= set(data["info"])
    kinds = {r["kind"]: r for r in data["rows"]}
    assert set(kinds) == {"smoke_prefill", "smoke_decode"}
    assert 0.0 < kinds["smoke_prefill"]["density"] < 1.0  # a genuinely sparse index went through
    for r in kinds.values():  # fp32 kernels against the dense-masked reference
        assert r["max_abs_err"] < 1e-4
