"""``kernels.estimate`` (the maths dynamic patterns estimate with) against float64 loop references.

Tolerances: the functions compute in fp32 from fp32 inputs; sums of up to a few hundred
probabilities carry ~1e-6 relative error, so 1e-5 (relative or absolute on values <= O(1)) holds.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.kernels import estimate
from pattern_refs import last_q_probs_fp64

FAST = settings(max_examples=25, deadline=None)
GQA = [(1, 1), (3, 3), (9, 3), (8, 2)]  # (query heads, KV heads): MHA, SmolLM2 (3), Llama (4)


@pytest.mark.parametrize("h,hkv", GQA)
@pytest.mark.parametrize("s,n_probe", [(1, 1), (37, 5), (130, 64)])  # one token, odd, a full probe
def test_vertical_slash_scores_match_loops(h, hkv, s, n_probe):
    torch.manual_seed(s * 10 + h)
    n_probe = min(n_probe, s)
    q = torch.randn(n_probe, h, 16)
    k = torch.randn(s, hkv, 16)
    kv = torch.arange(h) // (h // hkv)
    q_pos = list(range(s - n_probe, s))
    vert, slash = estimate.vertical_slash_scores(q, k, kv, torch.tensor(q_pos))
    probs = last_q_probs_fp64(q, k, kv.tolist(), q_pos, 1 / math.sqrt(16))
    want_v = probs.sum(1)
    want_s = torch.zeros(h, s, dtype=torch.float64)
    for i, p in enumerate(q_pos):
        for j in range(p + 1):
            want_s[:, p - j] += probs[:, i, j]
    torch.testing.assert_close(vert.double(), want_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slash.double(), want_s, rtol=1e-5, atol=1e-6)
    # every probe row is a distribution: the column mass adds up to the number of probes
    torch.testing.assert_close(vert.sum(-1).double(), torch.full((h,), float(n_probe), dtype=torch.float64),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("h,hkv", [(9, 3), (8, 2)])
@pytest.mark.parametrize("consecutive", [True, False])
def test_vertical_slash_scores_across_key_tiles(h, hkv, consecutive, monkeypatch):
    """Many key tiles (a tiny tile budget), probes at consecutive positions (the diagonal view) or not
    (the scatter), against the fp64 loops."""
    monkeypatch.setattr(estimate, "_CHUNK_ELEMS", 1)  # the 64-key minimum tile: 5 tiles over 300 keys
    torch.manual_seed(h + consecutive)
    s, n_probe = 300, 24
    q = torch.randn(n_probe, h, 16)
    k = torch.randn(s, hkv, 16)
    kv = torch.arange(h) // (h // hkv)
    q_pos = list(range(s - n_probe, s)) if consecutive else sorted(torch.randperm(s)[:n_probe].tolist())
    vert, slash = estimate.vertical_slash_scores(q, k, kv, torch.tensor(q_pos))
    probs = last_q_probs_fp64(q, k, kv.tolist(), q_pos, 1 / math.sqrt(16))
    want_s = torch.zeros(h, s, dtype=torch.float64)
    for i, p in enumerate(q_pos):
        for j in range(p + 1):
            want_s[:, p - j] += probs[:, i, j]
    torch.testing.assert_close(vert.double(), probs.sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slash.double(), want_s, rtol=1e-5, atol=1e-6)


@FAST
@given(st.integers(1, 40), st.integers(0, 45), st.data())
def test_topk_forced_keeps_forced_then_the_best(n, k, data):
    scores = torch.tensor(data.draw(st.lists(st.floats(-5, 5), min_size=n, max_size=n)))
    forced = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    allowed = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n))) | forced
    keep, count = estimate.topk_forced(scores, k, forced=forced, allowed=allowed)
    assert bool((keep <= allowed).all()), "kept an item that is not allowed"
    assert bool(keep[forced].all()), "dropped a forced item"
    assert int(count) == int(keep.sum()) == max(int(forced.sum()), min(k, int(allowed.sum())))
    free_kept = scores[keep & ~forced]
    free_left = scores[allowed & ~keep]
    if free_kept.numel() and free_left.numel():
        assert float(free_kept.min()) >= float(free_left.max())


@pytest.mark.parametrize("tq,s,block", [(64, 64, 64), (70, 200, 64), (5, 33, 16)])  # aligned, partial, tiny
def test_pooled_block_scores_match_loops(tq, s, block):
    torch.manual_seed(tq)
    q, k = torch.randn(tq, 4, 8), torch.randn(s, 2, 8)
    kv = torch.tensor([0, 0, 1, 1])
    got = estimate.pooled_block_scores(q, k, kv, block, block)
    for h in range(4):
        for a in range(-(-tq // block)):
            qm = q[a * block:(a + 1) * block, h].double().mean(0)
            for b in range(-(-s // block)):
                km = k[b * block:(b + 1) * block, kv[h]].double().mean(0)
                assert abs(float(got[h, a, b]) - float(qm @ km) / math.sqrt(8)) < 1e-5


@pytest.mark.parametrize("t,block", [(64, 64), (200, 64), (33, 16), (1, 16)])
def test_pooling_in_passes_equals_pooling_at_once(t, block):
    """Issue 12: keys are pooled a few blocks at a time; every pass size gives the same means, bit for bit."""
    torch.manual_seed(t)
    x = torch.randn(t, 3, 8).to(torch.bfloat16)
    whole = estimate.pool_blocks(x, block)
    ref = torch.stack([x[b:b + block].float().mean(0) for b in range(0, t, block)]).transpose(0, 1)
    assert torch.allclose(whole, ref, atol=1e-6)
    for pass_elems in (1, block * 24, block * 24 * 3 + 1):  # one block per pass, one, three
        assert torch.equal(estimate.pool_blocks(x, block, pass_elems=pass_elems), whole)


@pytest.mark.parametrize("chunk_elems", [estimate._CHUNK_ELEMS, 1])  # all blocks at once; one block per pass
def test_block_max_scores_takes_the_best_query_of_each_block(chunk_elems, monkeypatch):
    monkeypatch.setattr(estimate, "_CHUNK_ELEMS", chunk_elems)
    torch.manual_seed(1)
    tq, s = 134, 90  # three query blocks, the last partial (its padding must not win)
    q, k = torch.randn(tq, 3, 8), torch.randn(s, 3, 8)
    kv = torch.arange(3)
    pos = torch.randint(0, s, (3, 3, 5))
    got = estimate.block_max_scores(q, k, kv, pos, 64, scale=1.0)
    for h in range(3):
        for b in range(3):
            rows = q[b * 64:min(tq, (b + 1) * 64), h].double()
            for m in range(5):
                want = float((rows @ k[pos[h, b, m], h].double()).max())
                assert abs(float(got[h, b, m]) - want) < 1e-4


def _paged(keys: torch.Tensor, block_size: int, shuffle_seed: int = 0):
    """A paged cache holding ``keys [B, S, Hkv, D]`` in shuffled physical blocks, plus its block table."""
    b, s, hkv, d = keys.shape
    nblk = -(-s // block_size)
    perm = torch.randperm(b * nblk, generator=torch.Generator().manual_seed(shuffle_seed))
    cache = torch.zeros(b * nblk, hkv, block_size, d)
    table = perm.view(b, nblk).to(torch.int32)
    padded = torch.nn.functional.pad(keys, (0, 0, 0, 0, 0, nblk * block_size - s))
    for r in range(b):
        for j in range(nblk):
            cache[table[r, j]] = padded[r, j * block_size:(j + 1) * block_size].transpose(0, 1)
    return cache, table


def test_decode_scores_read_the_paged_cache():
    torch.manual_seed(2)
    keys = torch.randn(2, 45, 2, 8)
    cache, table = _paged(keys, 16)
    lens = torch.tensor([45, 20], dtype=torch.int32)
    q = torch.randn(2, 4, 8)
    kv = torch.tensor([0, 0, 1, 1])
    got = estimate.decode_scores(q, cache, table, lens, kv, scale=0.5)
    for r in range(2):
        for h in range(4):
            want = keys[r, : lens[r], kv[h]].double() @ q[r, h].double() * 0.5
            torch.testing.assert_close(got[r, h, : lens[r]].double(), want, rtol=1e-5, atol=1e-5)
            assert bool(torch.isinf(got[r, h, lens[r]:]).all())


@FAST
@given(st.integers(1, 70), st.sampled_from([4, 16]), st.integers(0, 2**16))
def test_page_scores_bound_every_key_in_the_page(length, page, seed):
    """Quest's score is an upper bound of q.k over the page; it is attained when the page is one key."""
    torch.manual_seed(seed)
    keys = torch.randn(1, length, 2, 8)
    cache, table = _paged(keys, 16, seed)
    lens = torch.tensor([length], dtype=torch.int32)
    kmin, kmax = estimate.page_min_max(cache, table, lens, page)
    q = torch.randn(1, 2, 8)
    score = estimate.page_scores(q, kmin, kmax, torch.tensor([0, 1]))
    for h in range(2):
        for p in range(-(-length // page)):
            dots = keys[0, p * page:min(length, (p + 1) * page), h] @ q[0, h]
            assert float(score[0, h, p]) >= float(dots.max()) - 1e-4
            if dots.numel() == 1:
                assert abs(float(score[0, h, p]) - float(dots[0])) < 1e-4
