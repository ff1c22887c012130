"""``bench/serve_cpu.py --quick --profile`` keeps working: real servers (stock, then the default
plan), the official client, and a results file with every measure and its ratio to stock, and each
length's prefill profile (stock's attention timed by ``stock_timing``, headwise's by its impl). A
smoke run: the figures are not asserted (benchmarks are not tests), only that they exist and make
sense."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]


def test_quick_serve_benchmark_writes_ratios_for_every_measure(tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_cpu.py"), "--quick", "--profile", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["runs"]] == ["stock", "profiled"]  # full runs add "stock-last"
    for run in data["runs"]:
        for row in run["rows"]:
            assert row["ttft_s"] > 0 and row["itl_s"] > 0 and row["e2e_s"] >= row["ttft_s"]
            assert all(r["completion_tokens"] == data["config"]["tokens"] for r in row["sequential"] + row["concurrent"])
            assert abs(row["prompt_tokens"] - row["length"]) < 0.2 * row["length"] + 40  # chat template + nonce
    ratios = data["ratios"]["profiled"]
    assert [r["length"] for r in ratios] == data["config"]["lengths"]
    assert all(set(r) == {"length", "ttft_s", "itl_s", "e2e_s", "concurrent_tok_s"} for r in ratios)
    assert out.with_suffix(".png").stat().st_size > 0
    for run in data["runs"]:
        backend = "stock" if run["label"] == "stock" else "headwise"
        for row in run["rows"]:
            prof = row["profile"]
            assert prof["backends"] == [backend], prof.get("error")
            assert prof["tokens"]["prefill"] >= row["prompt_tokens"] and prof["steps"] >= 1
            assert len(prof["layers"]) == 30 and all(layer["kernel_s"] > 0 for layer in prof["layers"])
            # the timed parts lie inside the attention call: what is left for the host is not negative
            assert all(layer["host_s"] >= -1e-6 and layer["attention_s"] >= layer["kernel_s"]
                       for layer in prof["layers"])
            assert (prof["prefill_density"] is None) == (backend == "stock")
    table = out.with_name(out.stem + "-profile.md").read_text()
    assert "| stock |" in table and "| profiled |" in table


def test_quick_paired_benchmark_alternates_stock_and_headwise(tmp_path):
    """``bench/serve_paired.py --quick``: both servers up at once, requests alternated (ABBA), every
    round's figures and the per-measure summary written."""
    out = tmp_path / "paired.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_paired.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (row,) = data["lengths"]
    assert len(row["pairs"]) == data["config"]["rounds"] == 2
    for pair in row["pairs"]:
        for side in ("stock", "headwise"):
            r = pair[side]
            assert r["ttft_s"] > 0 and r["itl_s"] > 0 and r["completion_tokens"] == data["config"]["tokens"]
    for m in ("ttft_s", "itl_s", "e2e_s"):
        s = row["summary"][m]
        assert s["rounds"] == 2 and s["ratio_median"] > 0 and 0 <= s["headwise_not_slower"] <= 1
