"""The benchmark scripts run: bench/kernels.py (on a machine without CUDA, its interpreter smoke run)
and bench/cpu_attention.py (a tiny CPU run); both exit 0 and write their JSON."""

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


def test_bench_cpu_attention_smoke(tmp_path):
    out = tmp_path / "cpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_attention.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {"cpu", "torch", "threads", "loadavg_start"} <= set(data["info"])
    rows = {r["family"]: r for r in data["rows"]}
    assert "dense" in rows and len(rows) > 5
    assert rows["dense"]["wall_ratio_to_dense"] == 1.0
    assert all(0.0 < r["density"] <= 1.0 and r["wall_s"] > 0 for r in rows.values())
