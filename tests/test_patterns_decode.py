"""Decode selectors on a real paged cache: window, MoA, S2, TidalDecode, Quest, and the layer entry point."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.kernels import decode_select
from headwise.kernels.index import DecodeMode
from headwise.patterns.dense import Dense
from headwise.patterns.decode import build_layer_decode_selection
from headwise.patterns.elastic_window import ElasticWindow, span
from headwise.patterns.page_topk import PageTopK
from headwise.patterns.strided import Strided
from headwise.patterns.tidal import Tidal, TidalState
from headwise.patterns.window import Window

FAST = settings(max_examples=20, deadline=None)
BLOCK = 16  # vLLM block size of the fake cache: smaller than S2's 64 and equal to Quest's page


def paged_batch(lens: list[int], h: int = 4, hkv: int = 2, d: int = 8, seed: int = 0):
    """Keys ``[B, max_len, Hkv, D]`` scattered into shuffled physical blocks, with q and a block table."""
    g = torch.Generator().manual_seed(seed)
    b, s = len(lens), max(lens)
    nblk = -(-s // BLOCK)
    keys = torch.randn(b, nblk * BLOCK, hkv, d, generator=g)
    perm = torch.randperm(b * nblk, generator=g)
    table = perm.view(b, nblk).to(torch.int32)
    cache = torch.zeros(b * nblk, hkv, BLOCK, d)
    for r in range(b):
        for j in range(nblk):
            cache[table[r, j]] = keys[r, j * BLOCK:(j + 1) * BLOCK].transpose(0, 1)
    q = torch.randn(b, h, d, generator=g)
    return keys, cache, table, torch.tensor(lens, dtype=torch.int32), q


def select(specs, lens, state=None, h=4, hkv=2, seed=0, **kw):
    keys, cache, table, seq_lens, q = paged_batch(lens, h, hkv, seed=seed)
    sel = build_layer_decode_selection(specs, list(range(h)), h, q, cache, table, seq_lens,
                                       kv_heads=torch.arange(h) // (h // hkv), num_layer_kv_heads=hkv,
                                       tidal_state=state, scale=1.0, **kw)
    return sel, keys, q, seq_lens


lengths = st.lists(st.integers(1, 200), min_size=1, max_size=3)


@FAST
@given(lengths, st.integers(0, 20), st.integers(1, 50))
def test_window_reads_sinks_and_the_recent_tokens(lens, sink, window):
    sel, _, _, seq_lens = select([Window(sink=sink, window=window)] * 4, lens)
    mask = sel.to_dense_mask(seq_lens)
    for r, n in enumerate(lens):
        want = [(j < sink or j >= n - window) for j in range(n)]
        assert mask[r, :, :n].tolist() == [want] * 4
        assert bool(mask[r, :, n - 1].all()), "the current token must be read"


def test_elastic_window_uses_the_total_length_of_each_request():
    spec = ElasticWindow(sink=4, alpha=0, beta=0.5)
    sel, _, _, seq_lens = select([spec] * 4, [300, 300], total_lens=torch.tensor([300, 1000]))
    assert sel.window[:, 0].tolist() == [span(spec, 300), span(spec, 1000)] == [128, 512]
    assert bool((sel.mode == DecodeMode.WINDOW).all())


@FAST
@given(lengths, st.integers(1, 3), st.integers(1, 4))
def test_strided_decode_blocks_follow_the_shards(lens, local, stride):
    spec = Strided(local_blocks=local, vert_stride=stride, block_size=64)
    sel, _, _, seq_lens = select([spec] * 4, lens)
    assert sel.block_size == 64
    step = max(1, stride // 2)
    for r, n in enumerate(lens):
        last = (n - 1) // 64
        for h in range(4):
            shift = (h // 2) * step
            want = [kb for kb in range(last + 1) if kb > last - local or (kb + shift) % stride == 0]
            assert sel.indices[r, h, : sel.count[r, h]].tolist() == want


@FAST
@given(lengths, st.integers(1, 40), st.integers(0, 999))
def test_tidal_select_picks_the_top_scores_and_reuse_reads_them(lens, top_k, seed):
    state = TidalState(max_batch=4, num_heads=4, top_k=64)
    sel, keys, q, seq_lens = select([Tidal(role="select", top_k=top_k)] * 4, lens, state, seed=seed)
    assert bool((sel.mode == DecodeMode.DENSE).all()), "a select layer attends densely"
    for r, n in enumerate(lens):
        for h in range(4):
            picked = state.positions[r, h, : state.counts[r, h]].tolist()
            assert picked == sorted(set(picked)) and len(picked) == min(top_k, n)
            assert n - 1 in picked, "the current token is always selected"
            scores = keys[r, :n, h // 2] @ q[r, h]
            others = [j for j in range(n) if j not in picked]
            free = [j for j in picked if j != n - 1]
            if others and free:
                assert float(scores[free].min()) >= float(scores[others].max()) - 1e-5
    reuse, _, _, _ = select([Tidal(role="reuse")] * 4, lens, state, seed=seed + 1)
    assert bool((reuse.mode == DecodeMode.POSITIONS).all())
    for r in range(len(lens)):
        assert torch.equal(reuse.count[r], state.counts[r])
        for h in range(4):
            c = int(state.counts[r, h])
            assert torch.equal(reuse.indices[r, h, :c], state.positions[r, h, :c])


def test_tidal_window_keeps_the_recent_tokens_within_the_budget():
    state = TidalState(max_batch=2, num_heads=4, top_k=16)
    select([Tidal(role="select", top_k=16, window=5)] * 4, [100, 3], state)
    for h in range(4):
        picked = state.positions[0, h, : state.counts[0, h]].tolist()
        assert len(picked) == 16 and set(range(95, 100)) <= set(picked)
        assert state.positions[1, h, : state.counts[1, h]].tolist() == [0, 1, 2]


def test_tidal_state_refuses_a_batch_larger_than_its_buffer():
    state = TidalState(max_batch=1, num_heads=4, top_k=8)
    with pytest.raises(ValueError, match="does not fit the buffer allocated for 1"):
        select([Tidal(role="select")] * 4, [10, 10], state)


@FAST
@given(lengths, st.sampled_from([16, 48, 160]), st.integers(0, 999))
def test_page_topk_keeps_the_best_pages_under_the_budget(lens, budget, seed):
    from headwise.kernels import estimate

    spec = PageTopK(page_size=16, budget=budget)
    sel, keys, q, seq_lens = select([spec] * 4, lens, seed=seed)
    assert sel.block_size == 16 and bool((sel.mode == DecodeMode.BLOCKS).all())
    _, cache, table, _, _ = paged_batch(lens, seed=seed)
    kmin, kmax = estimate.page_min_max(cache, table, seq_lens, 16)
    scores = estimate.page_scores(q, kmin, kmax, torch.arange(4) // 2)
    for r, n in enumerate(lens):
        pages = -(-n // 16)
        for h in range(4):
            kept = sel.indices[r, h, : sel.count[r, h]].tolist()
            assert kept == sorted(set(kept)) and len(kept) == min(budget // 16, pages)
            assert pages - 1 in kept, "the page of the current token is always read"
            rest = [p for p in range(pages) if p not in kept]
            free = [p for p in kept if p != pages - 1]
            if rest and free:
                assert float(scores[r, h, free].min()) >= float(scores[r, h, rest].max())


def test_mixed_heads_keep_their_order_and_share_one_block_size():
    """S2 blocks (64) and Quest pages (16) in one layer: S2's blocks are rewritten as 16-token blocks."""
    specs = [Strided(local_blocks=1, vert_stride=2), PageTopK(budget=32), Window(sink=1, window=3), Dense()]
    sel, _, _, seq_lens = select(specs, [150, 40])
    alone = [select([s] * 4, [150, 40])[0] for s in specs]
    assert sel.block_size == 16
    mask = sel.to_dense_mask(seq_lens)
    for h, a in enumerate(alone):
        assert torch.equal(mask[:, h], a.to_dense_mask(seq_lens)[:, h]), f"head {h} changed when mixed"


def test_dense_below_makes_short_requests_dense():
    sel, _, _, _ = select([Window(sink=1, window=2)] * 4, [50, 500], dense_below=100)
    assert sel.mode[0].tolist() == [DecodeMode.DENSE] * 4
    assert sel.mode[1].tolist() == [DecodeMode.WINDOW] * 4


@pytest.mark.parametrize("layout", ["contiguous", "kv-interleaved", "dim-major-pages"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,hkv", [(8, 4), (3, 1)], ids=["gqa", "one-kv-head"])  # one KV head: a TP rank's
def test_tiled_topk_equals_a_full_sort_of_the_scores(monkeypatch, layout, dtype, h, hkv):
    """Many small tiles, merged a few at a time, pick what one sort of all scores picks, on a bf16
    cache, on a cache view whose (block, head) rows do not merge (K of a ``[blocks, 2, ...]`` cache)
    and on the plugin's torch-read cache (K pages stored head-dim major beside V: ``split_kv``)."""
    lens = [700, 333, 1]
    monkeypatch.setattr(decode_select, "_TILE_ELEMS", 2 * len(lens) * hkv * BLOCK * 8)  # two blocks per tile
    monkeypatch.setattr(decode_select, "_MERGE_SPAN", 3 * 2 * BLOCK)  # merge every third tile
    keys, cache, table, seq_lens, q = paged_batch(lens, h=h, hkv=hkv, d=8, seed=5)
    if layout == "kv-interleaved":
        kv = torch.zeros(cache.shape[0], 2, *cache.shape[1:])
        kv[:, 0] = cache
        cache = kv[:, 0]
    elif layout == "dim-major-pages":  # the plugin's torch-read cache: K pages ``[D, bs]``, then V pages
        from headwise.server.plugin.kv_cache import split_kv

        kv = torch.zeros(cache.shape[0], cache.shape[1], cache.shape[2], 2 * cache.shape[3])
        k_view, _ = split_kv(kv)
        k_view.copy_(cache)
        cache = k_view
    cache, keys, q = cache.to(dtype), keys.to(dtype).float(), q.to(dtype)
    kv_heads = torch.arange(h) // (h // hkv)
    top_k = 40
    pos, count = decode_select.decode_topk(q, cache, table, seq_lens, kv_heads, top_k, scale=1.0)
    for r, n in enumerate(lens):
        for j in range(h):
            scores = keys[r, :n, j // (h // hkv)] @ q[r, j].float()
            scores[n - 1] = float("inf")  # the current token is forced in
            want = sorted(torch.topk(scores, min(top_k, n)).indices.tolist())
            assert pos[r, j, : count[r, j]].tolist() == want
