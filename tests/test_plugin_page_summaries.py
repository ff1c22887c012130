"""Quest page summaries kept by the impl as K/V are written, read by page_topk decode layers.

No engine: the real builder and impl over hand-built steps (``plugin_batches``). A prompt is
prefilled through the impl, then decode steps carry the same cache; after every step the impl's
summaries equal the key min/max recomputed from the cache, and its page_topk output equals the
same layer run without summaries (which recomputes them from every cached key: the oracle).
"""

from __future__ import annotations

import torch

from headwise.kernels import decode_select
from headwise.server.plugin.kv_cache import split_kv
from plugin_batches import HKV, Req, Step, make_backend, make_plan, run_layer
from plugin_batches import fresh_recorder  # noqa: F401  (autouse)

QUEST = {"type": "page_topk", "page_size": 8, "budget": 24}  # 3 of up to 10 pages: really sparse


def _recomputed(kv_cache, block_table, lens, page):
    k_cache, _ = split_kv(kv_cache)
    n = -(-int(lens.max()) // page)
    return decode_select._bounds_from_cache(k_cache, block_table, lens, 0, n, page)


def test_summaries_follow_every_write_and_page_topk_reads_them(tmp_path):
    plan = make_plan({"type": "dense"}, QUEST, num_layers=2)
    builder, impls = make_backend(plan, tmp_path)
    g = torch.Generator().manual_seed(11)
    prompt = [70, 45]
    kv = [(torch.randn(n + 4, HKV, 32, generator=g), torch.randn(n + 4, HKV, 32, generator=g)) for n in prompt]
    first = Step([Req(0, n, True) for n in prompt], seed=1, kv=kv)
    md = builder.build(0, first.common)
    for layer, impl in enumerate(impls):
        run_layer(impl, layer, first, md, first.query(layer))
    assert impls[0]._summaries is not None and impls[0]._summaries[0] is first.kv_cache
    for t in range(4):  # decode steps, one new token per request
        step = Step([Req(n + t, 1, False) for n in prompt], seed=2 + t, kv=kv,
                    block_table=first.block_table, kv_cache=first.kv_cache)
        md = builder.build(0, step.common)
        q = step.query(100 + t)
        out = run_layer(impls[0], 0, step, md, q)
        summ = impls[0]._summaries[1]
        lo, hi = decode_select.gather_page_bounds(summ, step.block_table, 0, -(-int(step.seq_lens.max()) // 8), 8)
        want_lo, want_hi = _recomputed(step.kv_cache, step.block_table, step.seq_lens, 8)
        for b, n in enumerate(step.seq_lens.tolist()):  # pages holding tokens of request b
            full = -(-n // 8)
            torch.testing.assert_close(lo[b, :full], want_lo[b, :full], atol=0, rtol=0)
            torch.testing.assert_close(hi[b, :full], want_hi[b, :full], atol=0, rtol=0)
        # the oracle: the same layer with its summaries hidden recomputes min/max from every key
        oracle = impls[0]
        kept = oracle._summaries
        oracle._summaries = None
        try:
            want = run_layer(oracle, 0, step, md, q, write=False)
        finally:
            oracle._summaries = kept
        torch.testing.assert_close(out, want, atol=0, rtol=0)
        sel = decode_select.page_topk(q, split_kv(step.kv_cache)[0], step.block_table, step.seq_lens,
                                      torch.arange(6) // 3, 8, 3, summary=summ)
        assert int(sel[1].max()) == 3 and int(step.seq_lens.min()) > 3 * 8  # 3 pages of more: sparse
    # and the layer really reads them: scrambled summaries pick other pages
    summ.kmin.copy_(summ.kmin[torch.randperm(summ.kmin.shape[0], generator=g)])
    assert not torch.allclose(run_layer(impls[0], 0, step, md, q, write=False), out)
