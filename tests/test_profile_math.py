"""The profiler's mathematics on synthetic attention: sampling, kept mass, the MILP, decode rules."""

import itertools

import numpy as np
import pytest
import torch

from headwise.patterns.a_shape import AShape
from headwise.patterns.base import PrefillInputs
from headwise.patterns.dense import Dense
from headwise.patterns.elastic_window import ElasticWindow
from headwise.patterns.plan import ModelGeometry, Plan
from headwise.patterns.prefill import build_prefill
from headwise.patterns.profile import choose_patterns, default_candidates, score_layer
from headwise.patterns.profile_sample import RowSample, kept_mass, rows_mask, sample_blocks
from headwise.patterns.profile_decode_rules import decode_for, default_select_layers
from headwise.patterns.strided import Strided
from headwise.patterns.vertical_slash import VerticalSlash

# GQA 3:1 like SmolLM2; 9 query heads so strided shards differ per KV head
HQ, HKV, D = 9, 3, 32


def _build(spec, q, k):
    s = q.shape[0]
    return build_prefill(spec, PrefillInputs(heads=list(range(HQ)), num_layer_heads=HQ, q_offset=0, q_len=s,
                                             total_len=s, q=q, k=k, kv_heads=torch.arange(HQ) // (HQ // HKV),
                                             num_layer_kv_heads=HKV))


def _needle_qk(s: int, needle: int, logit: float = 12.0, seed: int = 0):
    """q/k where every query of the second half attends mostly to key ``needle`` (a retrieval head):
    its scaled score is ``logit`` above the others' (~0), so it takes ~e^12 / (e^12 + s) of the mass."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, HQ, D, generator=g) * 0.1
    k = torch.randn(s, HKV, D, generator=g) * 0.1
    direction = torch.zeros(D)
    direction[0] = 1.0
    a = (logit * D ** 0.5) ** 0.5  # (a * a) * (1 / sqrt(D)) = logit
    k[needle] += direction * a
    q[s // 2:] += direction * a
    return q, k


@pytest.mark.parametrize("s", [64, 65, 300, 1000])  # one block, a partial last block, longer prompts
def test_sample_blocks_include_the_last_block_and_stay_in_the_second_half(s):
    blocks = sample_blocks(s, 4)
    nqb = -(-s // 64)
    assert blocks == sorted(set(blocks)) and blocks[-1] == nqb - 1
    assert all(nqb // 2 <= b < nqb for b in blocks)
    assert len(blocks) <= 4


@pytest.mark.parametrize("spec", [Dense(), AShape(sink=16, window=64), Strided(local_blocks=1, vert_stride=3),
                                  VerticalSlash(vertical=8, slash=4, local_diagonals=2, sink_columns=4),
                                  ElasticWindow(sink=8, alpha=64, beta=0.25)])
def test_kept_mass_equals_the_dense_mask_of_the_index(spec):
    # the prefix-sum shortcut against the index's own semantics (to_dense_mask), odd length 333
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(333, HQ, D, generator=g), torch.randn(333, HKV, D, generator=g)
    index = _build(spec, q, k)
    sample = RowSample.from_qk(q, k, torch.arange(HQ) // 3, n_blocks=3)
    # rows_mask is the index's own dense mask, cut to the sampled rows
    assert torch.equal(rows_mask(index, sample.blocks), index.to_dense_mask()[:, sample.rows])
    reference = (sample.probs * rows_mask(index, sample.blocks)).sum(-1)
    # fp32 probabilities summed in fp64 both ways: differences are fp32 rounding of ~300 terms
    torch.testing.assert_close(kept_mass(index, sample), reference, atol=1e-5, rtol=0)


def test_probabilities_are_causal_softmax_rows():
    q, k = _needle_qk(200, needle=10)
    sample = RowSample.from_qk(q, k, torch.arange(HQ) // 3, n_blocks=2)
    torch.testing.assert_close(sample.probs.sum(-1), torch.ones(HQ, len(sample.rows)), atol=1e-5, rtol=0)
    future = torch.arange(200).view(1, -1) > sample.rows.view(-1, 1)
    assert float(sample.probs[:, future].abs().max()) == 0.0


def test_a_retrieval_head_keeps_its_needle_only_under_patterns_that_reach_it():
    s, needle = 1024, 300  # the needle is far outside a 128-token window of the sampled rows
    q, k = _needle_qk(s, needle)
    cands = [Dense(), AShape(sink=64, window=128), VerticalSlash(vertical=64, slash=64, local_diagonals=64)]
    score = score_layer(q, k, cands, layer_heads=HQ, layer_kv_heads=HKV)
    assert np.allclose(score.mass[:, 0], 1.0, atol=1e-5) and np.allclose(score.density[:, 0], 1.0)
    assert (score.mass[:, 1] < 0.5).all()  # the window misses most of the mass
    assert (score.mass[:, 2] > 0.9).all()  # the needle's column is found by the estimate
    assert (score.density[:, 1:] < 0.5).all()


def test_a_long_prompt_is_scored_chunk_by_chunk_as_serving_builds_its_indices():
    """``score_layer(chunk=)`` against dense masks: every chunk's index built over the keys up to its
    last query (as chunked prefill builds it), density over all chunks, mass and output quality of
    the sampled rows under their own chunk's index; one chunk (``chunk`` >= the prompt) is the
    whole-prompt scoring."""
    from headwise.patterns.block_sparse import BlockSparse

    g = torch.Generator().manual_seed(11)
    s, chunk = 700, 256  # chunks [0, 256), [256, 512), [512, 700): samples in the last two
    q, k, v = torch.randn(s, HQ, D, generator=g), torch.randn(s, HKV, D, generator=g), torch.randn(s, HKV, D, generator=g)
    kv_heads = torch.arange(HQ) // (HQ // HKV)
    cands = [Dense(), AShape(sink=16, window=64), VerticalSlash(vertical=8, slash=4, local_diagonals=2, sink_columns=4),
             BlockSparse(top_k=3), Strided(local_blocks=1, vert_stride=3)]
    score = score_layer(q, k, cands, layer_heads=HQ, layer_kv_heads=HKV, v=v, chunk=chunk, n_blocks=4)
    whole = RowSample.from_qk(q, k, kv_heads, n_blocks=4)
    assert {b * 64 // chunk for b in whole.blocks} == {1, 2}
    vh = v[:, kv_heads].transpose(0, 1)
    dense_out = whole.probs @ vh
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    for c, spec in enumerate(cands):
        mask = torch.zeros(HQ, s, s, dtype=torch.bool)
        for c0 in range(0, s, chunk):
            c1 = min(s, c0 + chunk)
            inp = PrefillInputs(heads=list(range(HQ)), num_layer_heads=HQ, q_offset=c0, q_len=c1 - c0, total_len=s,
                                q=q[c0:c1], k=k[:c1], kv_heads=kv_heads, num_layer_kv_heads=HKV)
            mask[:, c0:c1, :c1] = build_prefill(spec, inp).to_dense_mask()
        assert not (mask & ~causal).any()
        np.testing.assert_allclose(score.density[:, c], (mask.sum((1, 2)).double() / causal.sum()).numpy(), rtol=1e-12)
        kept = whole.probs * mask[:, whole.rows]
        np.testing.assert_allclose(score.mass[:, c], kept.sum(-1).mean(-1).numpy(), atol=1e-5)
        out = (kept @ vh) / kept.sum(-1, keepdim=True)
        err = ((out - dense_out).norm(dim=-1) / dense_out.norm(dim=-1)).clamp(max=1)
        np.testing.assert_allclose(score.quality[:, c], (1 - err).mean(-1).numpy(), atol=1e-4)
    # the answer rows the decode scorers read: the last sampled block, over the keys up to its chunk's end
    assert score.sample.blocks[-1] == whole.blocks[-1] and score.sample.probs.shape[2] == s
    one = score_layer(q, k, cands, layer_heads=HQ, layer_kv_heads=HKV, v=v, chunk=s, n_blocks=4)
    full = score_layer(q, k, cands, layer_heads=HQ, layer_kv_heads=HKV, v=v, n_blocks=4)
    assert np.array_equal(one.mass, full.mass) and np.array_equal(one.density, full.density)
    # chunking changes what the dynamic patterns keep (their estimate sees only its chunk's queries)
    assert not np.allclose(one.density[:, 2:4], score.density[:, 2:4])


def test_default_candidates_scale_with_length_and_are_unique():
    short, long = default_candidates(1024), default_candidates(8192)
    assert isinstance(short[0], Dense) and len(set(short)) == len(short)
    w = lambda cs: sorted(c.window for c in cs if c.type == "a_shape")  # noqa: E731
    assert {(x - 1) * 8 + 1 for x in w(short)} <= set(w(long))  # whole 32-token pages plus the query
    assert all((x - 1) % 32 == 0 for x in w(long))


# ---------------------------------------------------------------------------- MILP
def _brute_force(mass, density, budget, max_per_layer=None):
    """Best total mass over every assignment that fits the mean-density budget (tiny problems only)."""
    n_l, n_h, n_c, _ = mass.shape
    best = -1.0
    for combo in itertools.product(range(n_c), repeat=n_l * n_h):
        pick = np.array(combo).reshape(n_l, n_h)
        if max_per_layer and any(len(set(row)) > max_per_layer for row in pick):
            continue
        li, hi = np.meshgrid(range(n_l), range(n_h), indexing="ij")
        if density[li, hi, pick].mean() <= budget + 1e-9:
            best = max(best, mass[li, hi, pick].mean())
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_per_layer", [None, 1])
def test_milp_matches_brute_force(seed, max_per_layer):
    rng = np.random.default_rng(seed)
    shape = (2, 3, 3, 2)  # layers, heads, candidates, lengths: 3^6 = 729 assignments
    mass, density = rng.random(shape), rng.random(shape)
    mass[:, :, 0], density[:, :, 0] = 1.0, 1.0  # candidate 0 is dense
    budget = 0.55
    best = _brute_force(mass, density, budget, max_per_layer)
    if best < 0:
        with pytest.raises(ValueError):
            choose_patterns(mass, density, budget, max_per_layer=max_per_layer)
        return
    choice = choose_patterns(mass, density, budget, max_per_layer=max_per_layer)
    assert choice.kept_mass == pytest.approx(best, abs=1e-6)
    assert np.mean(choice.density) <= budget + 1e-6
    if max_per_layer:
        assert all(len(set(row)) <= max_per_layer for row in choice.pick)


def test_milp_respects_allowed_choices_and_per_length_budgets():
    rng = np.random.default_rng(7)
    mass, density = rng.random((4, 5, 4, 2)), rng.random((4, 5, 4, 2))
    mass[:, :, 0], density[:, :, 0] = 1.0, 1.0
    density[..., 1] *= 0.5  # the second length is cheaper: a mean budget could overspend the first
    allowed = np.ones((4, 5, 4), dtype=bool)
    allowed[0, :, 1:] = False  # layer 0 forced dense
    choice = choose_patterns(mass, density, 0.45, allowed=allowed, per_length=True)
    assert (choice.pick[0] == 0).all()
    assert max(choice.density) <= 0.45 + 1e-6


def test_milp_prefers_the_sparser_of_two_equal_candidates():
    mass = np.ones((1, 2, 2, 1))  # both candidates keep everything
    density = np.array([1.0, 0.4]).reshape(1, 1, 2, 1).repeat(2, axis=1)
    assert (choose_patterns(mass, density, 1.0).pick == 1).all()


def test_a_budget_below_every_plan_says_what_can_be_reached():
    mass, density = np.ones((1, 2, 2, 1)), np.full((1, 2, 2, 1), 0.5)
    with pytest.raises(ValueError, match=r"budget 0.100 is below 0.500"):
        choose_patterns(mass, density, 0.1)


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


def test_output_quality_is_the_relative_error_of_the_masked_softmax_output():
    """Against a direct computation: softmax over the kept keys only, times V, vs dense."""
    from headwise.patterns.profile_sample import output_quality

    g = torch.Generator().manual_seed(3)
    s, hq, hkv, d = 384, 4, 2, 16
    q, k, v = (torch.randn(s, h, d, generator=g) for h in (hq, hkv, hkv))
    kv_heads = torch.arange(hq) // 2
    inp = PrefillInputs(heads=list(range(hq)), num_layer_heads=hq, q_offset=0, q_len=s, total_len=s, q=q, k=k,
                        kv_heads=kv_heads, block_m=64, num_layer_kv_heads=hkv)
    sample = RowSample.from_qk(q, k, kv_heads, n_blocks=3)
    dense_q = output_quality(build_prefill(Dense(), inp), sample, v, kv_heads)
    assert torch.allclose(dense_q, torch.ones(hq), atol=1e-5)
    index = build_prefill(AShape(sink=16, window=64), inp)
    got = output_quality(index, sample, v, kv_heads)
    mask = rows_mask(index, sample.blocks)
    scores = torch.einsum("nhd,shd->hns", q[sample.rows], k[:, kv_heads]) / d ** 0.5
    causal = torch.arange(s)[None, None, :] <= sample.rows[None, :, None]
    vh = v[:, kv_heads].transpose(0, 1)
    full = torch.softmax(scores.masked_fill(~causal, -torch.inf), -1) @ vh
    part = torch.softmax(scores.masked_fill(~(mask & causal), -torch.inf), -1) @ vh
    want = (1 - ((part - full).norm(dim=-1) / full.norm(dim=-1)).clamp(max=1)).mean(-1)
    assert torch.allclose(got, want, atol=1e-4)
    assert (got < 1).all()  # the window drops keys the rows attend to


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
