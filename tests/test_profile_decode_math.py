"""The profiler's decode side on synthetic attention: the decode rules, TidalDecode's select-layer
schedule, and decode chosen by optimisation (candidates, kept mass, the solver, its cost model)."""

import itertools

import numpy as np
import pytest
import torch

from headwise.patterns.a_shape import AShape
from headwise.patterns.dense import Dense
from headwise.patterns.plan import ModelGeometry, Plan
from headwise.patterns.profile_sample import RowSample
from headwise.patterns.profile_decode_rules import decode_for, default_select_layers
from headwise.patterns.vertical_slash import VerticalSlash

# GQA 3:1 like SmolLM2; 9 query heads so strided shards differ per KV head
HQ, HKV, D = 9, 3, 32


# -------------------------------------------------------------------------- decode
def test_default_select_layers_start_at_two_and_spread():
    assert default_select_layers(30) == [2, 9, 16, 23]
    assert default_select_layers(2) == []
    assert default_select_layers(4, selections=4) == [2, 3]


def test_decode_rules_give_a_valid_plan_for_mixed_heads():
    layers, heads = 6, 3
    pre = [[AShape(sink=8, window=64), VerticalSlash(), Dense()] for _ in range(layers)]
    select = [2, 4]
    # head 1 of layer 3 was measured to lose too much on the reused pick
    dec = [[decode_for(pre[l][h], l, select, "auto", reuse_ok=(l, h) != (3, 1)) for h in range(heads)]
           for l in range(layers)]
    assert [d.type for d in dec[0]] == ["dense"] * 3  # before the first selection
    assert all(d.type == "tidal" and d.role == "select" for d in dec[2] + dec[4])
    assert [d.type for d in dec[3]] == ["tidal", "dense", "tidal"] and dec[5][1].role == "reuse"
    geometry = ModelGeometry(architecture="LlamaForCausalLM", num_layers=layers, num_heads=heads,
                             num_kv_heads=1, head_dim=64)
    plan = Plan.from_tables(geometry, pre, dec)  # the plan's own check: every reuse has a select before it
    assert plan.decode(5, 2).type == "tidal" and plan.prefill(1, 0) == AShape(sink=8, window=64)
    assert decode_for(pre[0][1], 3, select, "tidal", reuse_ok=False).role == "reuse"  # tidal: no fallback
    matched = [decode_for(p, 3, select, "matched") for p in pre[0]]
    assert matched[0].type == "window" and matched[0].window == 64 and matched[1].type == matched[2].type == "dense"
    assert all(decode_for(p, 3, select, "dense").type == "dense" for p in pre[0])
    with pytest.raises(ValueError, match="decode mode"):
        decode_for(Dense(), 0, select, "sometimes")


# ------------------------------------------------------------------ TidalDecode schedule
def _sample_on(positions: list[int], s: int = 40) -> RowSample:
    """Rows 32..39 (one block of 64 holds them all); head ``h`` puts 90% of its mass on ``positions[h]``."""
    rows = torch.arange(32, s)
    probs = torch.full((len(positions), len(rows), s), 0.0)
    probs[..., :32] = 0.1 / 32
    for h, p in enumerate(positions):
        probs[h, :, p] += 0.9
    prefix = torch.nn.functional.pad(torch.cumsum(probs.double(), -1), (1, 0))
    return RowSample([0], rows, probs, prefix)


def test_tidal_scores_measure_how_much_a_later_layer_keeps_of_an_earlier_pick():
    from headwise.patterns.profile_decode_rules import TidalScores

    ts = TidalScores(num_layers=3, top_k=2, num_heads=2)  # the pick: the needle and the current token
    for layer, needles in enumerate([[5, 7], [5, 8], [9, 7]]):  # per head: the needle each head reads
        ts.add(layer, _sample_on(needles))
    reuse = ts.reuse()  # [L, L, H]
    kept = 0.9 + 0.1 / 32
    assert reuse[0, 1, 0] == pytest.approx(kept, abs=1e-6)  # head 0 reads 5 in layers 0 and 1: kept
    assert reuse[0, 1, 1] < 0.01  # head 1 moved from 7 to 8: lost
    assert reuse[0, 2, 1] == pytest.approx(kept, abs=1e-6) and reuse[1, 2, 1] < 0.01
    assert reuse[0, 2, 0] < 0.01 and reuse[1, 2, 0] < 0.01
    assert np.isnan(reuse[1, 0]).all() and np.isnan(reuse[2, 2]).all()  # only earlier picks are measured
    with pytest.raises(ValueError, match="heads"):
        ts.add(0, _sample_on([5]))


@pytest.mark.parametrize("seed", range(3))
def test_select_layers_dp_matches_brute_force(seed):
    from headwise.patterns.profile_decode_rules import choose_select_layers

    n, first, selections = 9, 2, 3
    reuse = np.triu(np.random.default_rng(seed).random((n, n)), k=1)

    def mass(layers):
        total = first
        for l in range(first, n):
            last = max(s for s in layers if s <= l)
            total += 1.0 if l == last else reuse[last, l]
        return total / n

    best = max(mass([first, *rest]) for rest in itertools.combinations(range(first + 1, n), selections - 1))
    layers, value = choose_select_layers(reuse, selections, first)
    assert layers[0] == first and len(layers) == selections and layers == sorted(layers)
    assert value == pytest.approx(best) and mass(layers) == pytest.approx(best)


# ------------------------------------------------------------- decode by optimisation
def test_decode_candidates_scale_with_the_longest_length():
    from headwise.patterns.profile_decode import decode_candidates

    cands = decode_candidates([2048, 8192])
    assert cands[0] == Dense() and [c.window for c in cands[1:]] == [256, 512, 1024, 2048, 4096]
    assert all(c.sink == 64 for c in cands[1:])
    assert all(c.window + c.sink < 320 for c in decode_candidates([256, 320])[1:])


def test_decode_kept_mass_equals_the_mask_the_decode_kernel_reads():
    """The prefix-sum mass of a window against the positions ``selection_positions`` reads."""
    from headwise.kernels.decode import selection_positions
    from headwise.kernels.index import DecodeMode, DecodeSelection
    from headwise.patterns.profile_decode import answer_rows, decode_keep_mask, decode_kept_mass
    from headwise.patterns.window import Window

    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(333, HQ, D, generator=g), torch.randn(333, HKV, D, generator=g)
    sample = RowSample.from_qk(q, k, torch.arange(HQ) // 3, n_blocks=3)
    rows = answer_rows(sample)
    pos = sample.rows[rows]
    assert pos.min() == sample.blocks[-1] * 64 and len(pos) == 333 - sample.blocks[-1] * 64
    for spec in (Dense(), Window(sink=16, window=40), Window(sink=64, window=32), Window(sink=0, window=500)):
        mask = decode_keep_mask(spec, pos, 333)
        if spec.type == "window":  # the kernel's own positions for a request of len p + 1
            sel = DecodeSelection.uniform(len(pos), 1, DecodeMode.WINDOW, sink=spec.sink, window=spec.window)
            at, valid = selection_positions(sel, pos + 1, spec.sink + spec.window)
            kernel = torch.zeros(len(pos), 333, dtype=torch.bool)
            for r in range(len(pos)):
                kernel[r, at[r, 0][valid[r, 0]]] = True
            assert torch.equal(mask, kernel)
        want = (sample.probs[:, rows] * mask[None]).sum(-1)
        torch.testing.assert_close(decode_kept_mass(spec, sample, rows), want, atol=1e-5, rtol=0)


def _decode_brute_force(score, costs, budget):
    """Best mean score over every assignment whose ``decode_plan_cost`` fits the budget at every length."""
    from headwise.patterns.profile_decode import decode_plan_cost

    n_l, n_h, n_c, _ = score.shape
    best, li, hi = -1.0, *np.meshgrid(range(n_l), range(n_h), indexing="ij")
    for combo in itertools.product(range(n_c), repeat=n_l * n_h):
        pick = np.array(combo).reshape(n_l, n_h)
        if (decode_plan_cost(pick, costs) <= np.asarray(budget) + 1e-9).all():
            best = max(best, score[li, hi, pick].mean())
    return best


def _decode_problem(seed, kernel_dense=1.3, window_vs_dense=(0.2, 0.9), shared=1.0):
    from headwise.patterns.profile_decode import DecodeCosts

    rng = np.random.default_rng(seed)
    score = rng.random((2, 3, 3, 2))  # layers, heads, candidates (dense + 2 windows), lengths
    score[:, :, 0] = 1.0
    op = np.array([1e-3, 2e-3])
    kernel = op * np.array([[kernel_dense], *[[rng.uniform(*window_vs_dense)] for _ in range(2)]])
    return score, DecodeCosts(op, op * shared, kernel)


@pytest.mark.parametrize("budget", [1.0, 1.5])
def test_decode_solver_keeps_every_head_dense_when_dense_is_the_fastest(budget):
    """CPU: vLLM's op decodes densely faster than the torch kernel reads a window; a budget of 1
    (the default) or more then gives the all-dense plan, which also keeps the most."""
    from headwise.patterns.profile_decode import choose_decode

    score, costs = _decode_problem(0, window_vs_dense=(1.1, 1.2))
    choice = choose_decode(score, costs, budget)
    assert (choice.pick == 0).all() and choice.cost == pytest.approx([1.0, 1.0]) and choice.kept == 1.0
    with pytest.raises(ValueError, match="below"):
        choose_decode(score, costs, 0.9)  # no plan is faster than dense: said, not "infeasible"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [0.85, (0.9, 0.75), 0.7])
@pytest.mark.parametrize("shared", [1.0, 1.2])  # 1.2: the kernel-readable layout slows the op's dense layers
def test_decode_solver_matches_brute_force_and_holds_the_budget_at_every_length(seed, budget, shared):
    from headwise.patterns.profile_decode import choose_decode, decode_plan_cost

    score, costs = _decode_problem(seed, shared=shared)
    best = _decode_brute_force(score, costs, budget)
    if best < 0:
        with pytest.raises(ValueError):
            choose_decode(score, costs, budget)
        return
    choice = choose_decode(score, costs, budget)
    assert choice.kept == pytest.approx(best, abs=1e-6)
    cost = decode_plan_cost(choice.pick, costs)
    assert (cost <= np.broadcast_to(budget, (2,)) + 1e-6).all() and choice.cost == pytest.approx(list(cost))
    assert (choice.pick != 0).any()  # a budget under 1 needs a window somewhere


def test_decode_plan_cost_follows_the_servers_routing():
    """A layer with one selecting head runs all its heads on the kernel; the others stay on the op
    (in the shared layout once any layer uses the kernel)."""
    from headwise.patterns.profile_decode import DecodeCosts, decode_plan_cost

    costs = DecodeCosts(np.array([1.0]), np.array([1.5]), np.array([[3.0], [0.3]]))  # per layer of 3 heads
    assert decode_plan_cost(np.zeros((2, 3), dtype=int), costs) == pytest.approx([1.0])
    mixed = np.array([[1, 0, 0], [0, 0, 0]])  # layer 0: one window head + two dense heads on the kernel
    assert decode_plan_cost(mixed, costs) == pytest.approx([(0.1 + 2 * 1.0 + 1.5) / 2])
    assert decode_plan_cost(np.ones((2, 3), dtype=int), costs) == pytest.approx([0.3])
