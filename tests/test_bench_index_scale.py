"""Smoke test of bench/index_scale.py --quick: it runs and writes its JSON (no speed is asserted), and
its memory meter counts what a builder allocates, not views of its inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("index_scale", ROOT / "bench" / "index_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_memory_meter_counts_new_tensors_and_not_views_of_the_inputs():
    import torch

    meter = _bench().LiveBytes
    k = torch.zeros(1 << 20, dtype=torch.bfloat16)  # 2 MiB of input

    def build():
        view = k[1024:].view(-1, 8)[:, :4]  # slices of the input: no new memory
        made = view.float()  # a copy of (almost) half of it in fp32: 2 MiB less 2 KiB
        return made.sum()

    with meter([k]) as seen:
        build()
    made = ((1 << 20) - 1024) // 2 * 4
    assert made <= seen.peak <= made + 64, seen.peak
    with meter() as blind:  # the input not declared: its whole storage is counted through the views
        build()
    assert blind.peak >= made + (2 << 20), blind.peak


def test_index_scale_quick_writes_results(tmp_path):
    mod = _bench()
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "index_scale_quick.json").read_text())
    assert {r["family"] for r in res["prefill"]} == set(mod.PREFILL)
    assert all(r["peak_extra_bytes"] > 0 for r in res["prefill"] if r["family"] != "strided")
