"""Smoke test of bench/index_scale.py --quick: it runs and writes its JSON (no speed is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_index_scale_quick_writes_results(tmp_path):
    spec = importlib.util.spec_from_file_location("index_scale", ROOT / "bench" / "index_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "index_scale_quick.json").read_text())
    assert {r["family"] for r in res["prefill"]} == set(mod.PREFILL)
    assert all(r["peak_extra_bytes"] > 0 for r in res["prefill"] if r["family"] != "strided")
