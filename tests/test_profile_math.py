"""The profiler's prefill mathematics on synthetic attention: sampling, kept mass, output quality,
chunked scoring, the MILP (the decode side: test_profile_decode_math.py)."""

import itertools

import numpy as np
import pytest
import torch

from headwise.patterns.a_shape import AShape
from headwise.patterns.base import PrefillInputs
from headwise.patterns.block_sparse import BlockSparse
from headwise.patterns.dense import Dense
from headwise.patterns.elastic_window import ElasticWindow
from headwise.patterns.prefill import build_prefill
from headwise.patterns.profile import choose_patterns, default_candidates, score_layer
from headwise.patterns.profile_sample import RowSample, kept_mass, rows_mask, sample_blocks
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


_CHUNK_S = 700  # chunks of 256: [0, 256), [256, 512), [512, 700), the samples in the last two


def _chunk_case():
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(_CHUNK_S, h, D, generator=g) for h in (HQ, HKV, HKV))
    return q, k, v


_CHUNK_CANDIDATES = [Dense(), AShape(sink=16, window=64),
                     VerticalSlash(vertical=8, slash=4, local_diagonals=2, sink_columns=4),
                     BlockSparse(top_k=3), Strided(local_blocks=1, vert_stride=3)]


@pytest.mark.parametrize("chunk", [256, None])  # None: the whole prompt as one chunk
def test_a_long_prompt_is_scored_chunk_by_chunk_as_serving_builds_its_indices(chunk):
    """``score_layer(chunk=)`` against dense masks: every chunk's index built over the keys up to its
    last query (as chunked prefill builds it), density over all chunks, mass and output quality of
    the sampled rows under their own chunk's index."""
    q, k, v = _chunk_case()
    s, step = _CHUNK_S, chunk or _CHUNK_S
    kv_heads = torch.arange(HQ) // (HQ // HKV)
    score = score_layer(q, k, _CHUNK_CANDIDATES, layer_heads=HQ, layer_kv_heads=HKV, v=v, chunk=chunk, n_blocks=4)
    whole = RowSample.from_qk(q, k, kv_heads, n_blocks=4)
    vh = v[:, kv_heads].transpose(0, 1)
    dense_out = whole.probs @ vh
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    for c, spec in enumerate(_CHUNK_CANDIDATES):
        mask = torch.zeros(HQ, s, s, dtype=torch.bool)
        for c0 in range(0, s, step):
            c1 = min(s, c0 + step)
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


def test_chunking_changes_what_the_dynamic_patterns_keep():
    """The estimated patterns (vertical-slash, block-sparse) see only their chunk's queries, so the
    chunked scoring is not the whole-prompt one; position-only patterns keep the same pairs."""
    q, k, v = _chunk_case()
    kv_heads = torch.arange(HQ) // (HQ // HKV)
    assert {b * 64 // 256 for b in RowSample.from_qk(q, k, kv_heads, n_blocks=4).blocks} == {1, 2}
    chunked = score_layer(q, k, _CHUNK_CANDIDATES, layer_heads=HQ, layer_kv_heads=HKV, chunk=256, n_blocks=4)
    whole = score_layer(q, k, _CHUNK_CANDIDATES, layer_heads=HQ, layer_kv_heads=HKV, n_blocks=4)
    assert not np.allclose(chunked.density[:, 2:4], whole.density[:, 2:4])
    np.testing.assert_allclose(chunked.density[:, [0, 1, 4]], whole.density[:, [0, 1, 4]], rtol=1e-12)


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
