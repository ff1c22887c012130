"""Quest's incremental page summaries equal a recomputation after any sequence of cache writes,
and builders on the CUDA code path read nothing back on the host (run on CPU under a detector)."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.kernels import estimate
from headwise.kernels.decode_select import PageSummaries, gather_page_bounds, update_page_summaries
from host_sync import NoHostSync

BS, HKV, D = 16, 2, 4


def _write(cache, summ, keys, slots):
    ok = slots >= 0
    cache.view(-1, HKV, D)[slots[ok]] = keys[ok]  # flat slot view of [blocks, bs, Hkv, D]; padding skipped
    update_page_summaries(summ, keys, slots, BS)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([4, 8, 16]))
def test_incremental_equals_recompute_after_reuse_and_prefix_hits(seed, page):
    """Requests grow by chunks and single tokens; some finish and their blocks are reused from
    offset 0 (preemption / eviction), one starts on another's full blocks (a prefix-cache hit)."""
    rng = random.Random(seed)
    nblocks = 12
    cache = torch.zeros(nblocks, BS, HKV, D)  # slot = block * BS + offset
    summ = PageSummaries.empty(nblocks, BS, page, HKV, D, dtype=torch.float32)
    free = list(range(nblocks))
    reqs: dict[int, tuple[list[int], int]] = {}  # id -> (blocks, length)
    for step in range(40):
        op = rng.random()
        if op < 0.25 and free:  # a new request (maybe on a finished one's full blocks: prefix hit)
            blocks, n = [], 0
            donors = [r for r in reqs.values() if r[1] >= BS]
            if donors and rng.random() < 0.5:
                blocks, n = list(donors[0][0][:1]), BS
            reqs[step] = (blocks, n)
        elif op < 0.4 and reqs:  # finish / preempt: blocks go back to the pool (content stays stale)
            rid = rng.choice(list(reqs))
            blocks, _ = reqs.pop(rid)
            shared = {b for r in reqs.values() for b in r[0]}
            free.extend(b for b in blocks if b not in shared)
        elif reqs:  # append 1..20 tokens to a request
            rid = rng.choice(list(reqs))
            blocks, n = reqs[rid]
            add = rng.randint(1, 20)
            while len(blocks) * BS < n + add and free:
                blocks.append(free.pop(rng.randrange(len(free))))
            add = min(add, len(blocks) * BS - n)
            pos = torch.arange(n, n + add)
            slots = torch.tensor(blocks, dtype=torch.long)[pos // BS] * BS + pos % BS
            slots = torch.cat([slots, torch.tensor([-1])])  # a padding slot, skipped
            _write(cache, summ, torch.randn(add + 1, HKV, D), slots)
            reqs[rid] = (blocks, n + add)
    live = [(b, n) for b, n in reqs.values() if n > 0]
    if not live:
        return
    width = max(len(b) for b, _ in live)
    table = torch.tensor([b + [0] * (width - len(b)) for b, _ in live], dtype=torch.int32)
    lens = torch.tensor([n for _, n in live])
    k_cache = cache.permute(0, 2, 1, 3)  # [blocks, Hkv, bs, D] view, as the selectors read it
    want_lo, want_hi = estimate.page_min_max(k_cache, table, lens, page)
    got_lo, got_hi = gather_page_bounds(summ, table, 0, want_lo.shape[1], page)
    for r, n in enumerate(lens.tolist()):
        p = -(-n // page)
        assert torch.equal(got_lo[r, :p], want_lo[r, :p]) and torch.equal(got_hi[r, :p], want_hi[r, :p])


def test_builders_do_not_sync_on_the_cuda_path(monkeypatch):
    from headwise.patterns import block_sparse, hierarchical, strided, vertical_slash
    from headwise.patterns.base import PrefillInputs

    monkeypatch.setattr(estimate, "FORCE_FIXED_SHAPES", True)
    g = torch.Generator().manual_seed(0)
    h, hkv, tq, off = 8, 2, 200, 300
    inp = PrefillInputs(heads=list(range(h)), num_layer_heads=h, num_layer_kv_heads=hkv, q_offset=off, q_len=tq,
                        total_len=off + tq, q=torch.randn(tq, h, 16, generator=g),
                        k=torch.randn(off + tq, hkv, 16, generator=g), kv_heads=torch.arange(h) // (h // hkv))
    specs = [(block_sparse, block_sparse.BlockSparse(top_k=3)), (strided, strided.Strided(local_blocks=2, vert_stride=3)),
             (hierarchical, hierarchical.Hierarchical(sink=8, window=24, stages=[{"chunk": 16, "budget": 64},
                                                                                 {"chunk": 4, "budget": 16}],
                                                      refresh=[2, 1]))]
    for mod, spec in specs:
        want = mod.build_prefill(spec, inp).to_dense_mask()
        with NoHostSync():
            idx = mod.build_prefill(spec, inp)
        assert torch.equal(idx.to_dense_mask(), want), spec.type
    # vertical_slash: its CUDA estimate is the Triton kernel; the selection and layout are checked here
    spec = vertical_slash.VerticalSlash(vertical=10, slash=12, local_diagonals=4)
    sel = vertical_slash.select(spec, inp.q, inp.k, inp.kv_heads, off)
    want = vertical_slash.index_from_selection(*sel, tq, off, 64, fixed=False).to_dense_mask()
    with NoHostSync():
        idx = vertical_slash.index_from_selection(*sel, tq, off, 64)
    assert torch.equal(idx.to_dense_mask(), want)
