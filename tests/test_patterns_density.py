"""Closed-form expected densities equal the density of the index the builders make, and cost the
same at any length (``GET /v1/headwise/plan?length=10^10`` once allocated ~20 GB)."""

from __future__ import annotations

import random
import time

import pytest
import torch

from headwise.patterns import density
from headwise.patterns.a_shape import sink_window_index
from headwise.patterns.base import PrefillInputs
from headwise.patterns.plan import MAX_CELLS, Plan, PlanError, load_plan
from headwise.patterns.ranges import fast_density
from headwise.patterns.strided import Strided, _shift, build_prefill

from test_plan import CONFIGS


def test_sink_window_density_is_the_built_index_density():
    rng = random.Random(0)
    one = torch.ones(1, dtype=torch.long)
    for _ in range(200):
        sink, window = rng.choice([0, 1, 4, 64, 100]), rng.choice([0, 1, 5, 63, 64, 65, 512, 1000])
        length, block = rng.randint(1, 3000), rng.choice([16, 64, 128])
        built = fast_density(sink_window_index(one * sink, one * window, length, 0, block))
        assert density.sink_window_density(sink, window, length, block) == pytest.approx(built, abs=1e-12), \
            (sink, window, length, block)


def test_strided_density_is_the_built_index_density():
    rng = random.Random(1)
    for _ in range(120):
        p = Strided(local_blocks=rng.choice([1, 2, 4, 16]), vert_stride=rng.choice([1, 2, 3, 8]),
                    offset=rng.choice([0, 1, 5]), block_size=rng.choice([16, 32, 64, 128]))
        heads = rng.choice([1, 3, 9])
        kv = rng.choice([h for h in (1, 3, 9) if heads % h == 0])
        length, block = rng.randint(1, 3000), rng.choice([16, 64, 128])
        inp = PrefillInputs(heads=list(range(heads)), num_layer_heads=heads, q_offset=0, q_len=length,
                            total_len=length, block_m=block, num_layer_kv_heads=kv)
        shifts = _shift(p, inp.global_kv_heads(), kv).tolist()
        got = density.strided_density(p.local_blocks, p.vert_stride, p.block_size, shifts, length, block)
        assert got == pytest.approx(fast_density(build_prefill(p, inp)), abs=1e-12), (p, heads, kv, length, block)


def test_strided_sample_is_close_to_the_exact_sum(monkeypatch):
    exact_rows = 1 << 30
    sampled = density.strided_density(16, 8, 64, [0, 2, 4], 5_000_000, 64)
    monkeypatch.setattr(density, "STRIDED_MAX_ROWS", exact_rows)
    exact = density.strided_density(16, 8, 64, [0, 2, 4], 5_000_000, 64)
    assert sampled != exact and sampled == pytest.approx(exact, rel=1e-4)


def test_block_topk_and_capped_keys_match_the_per_token_sums():
    for top_k, length, b in [(1, 1, 64), (4, 1000, 64), (16, 8192, 64), (40, 200_000, 16), (3, 70, 128)]:
        nqb = -(-length // b)
        qb = torch.arange(nqb, dtype=torch.float64)
        frac = torch.clamp(qb + 1, max=top_k) / (qb + 1)
        pairs = b * b * qb + b * (b + 1) / 2
        assert density.block_topk_density(top_k, length, b) == pytest.approx(float((frac * pairs).sum() / pairs.sum()))
    for keys, length in [(0, 5), (10.5, 100), (1000, 999), (64, 8192)]:
        t = torch.arange(length, dtype=torch.float64)
        want = float(torch.clamp(t + 1, max=keys).sum() / (t + 1).sum())
        assert density.density_for_keys(keys, length) == pytest.approx(want)


def test_plan_summary_costs_the_same_at_any_length():
    plan = load_plan(CONFIGS / "smollm2-135m-instruct" / "sparse.json")
    took = {}
    for n in (8191, 10**10, 10**12):
        t = time.perf_counter()
        plan.summary(n)
        took[n] = time.perf_counter() - t
    assert took[10**12] < max(0.2, 10 * took[8191]), took
    assert plan.summary(10**12) == plan.summary(10**12)  # cached rows, same answer
    with pytest.raises(ValueError, match="expected 0.."):
        plan.summary(10**15)


@pytest.mark.parametrize("geometry,message", [
    ({"num_layers": 10**9}, "num_layers: expected a number <= 1024"),
    ({"num_heads": 10**9, "num_kv_heads": 3}, "num_heads: expected a number <= 1024"),
    ({"head_dim": 10**6}, "head_dim: expected a number <= 4096"),
    ({"num_layers": 1000, "num_heads": 900}, f"at most {MAX_CELLS} (layer, head) cells"),
])
def test_a_huge_geometry_is_refused_by_validation_at_once(geometry, message):
    model = {"architecture": "LlamaForCausalLM", "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
             "head_dim": 64, **geometry}
    t = time.perf_counter()
    with pytest.raises(PlanError) as err:
        Plan.from_dict({"model": model}, source="huge.json")
    assert time.perf_counter() - t < 1.0
    assert message in str(err.value) and "huge.json" in str(err.value)
