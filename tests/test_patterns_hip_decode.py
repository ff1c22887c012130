"""HiP decode: the refreshed hierarchical selection over the paged cache.

At a step where every stage runs, a decode step is a one-query prefill chunk: the selection must
equal the prefill builder's index for that query (a second derivation: contiguous keys, query
block scores). Between refreshes the cached stage outputs are reused; attention over the
selection must match the dense-masked reference.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.kernels.decode import sparse_decode_torch
from headwise.kernels.index import DecodeMode
from headwise.kernels.reference import decode_attention_reference
from headwise.patterns.base import PrefillInputs
from headwise.patterns.decode import build_layer_decode_selection
from headwise.patterns.hierarchical import Hierarchical, build_prefill
from headwise.patterns.hierarchical_decode import HipDecodeState
from test_patterns_decode import paged_batch

FAST = settings(max_examples=20, deadline=None)
SPECS = [Hierarchical(sink=8, window=24, stages=[{"chunk": 16, "budget": 64}, {"chunk": 4, "budget": 16}],
                      refresh=[4, 2]),
         Hierarchical(sink=3, window=10, stages=[{"chunk": 8, "budget": 32}], refresh=[3])]  # one stage, odd sink
H, HKV, D = 4, 2, 8


def decode(spec, lens, seed, state=None, step=0):
    keys, cache, table, seq_lens, q = paged_batch(lens, H, HKV, seed=seed)
    sel = build_layer_decode_selection([spec] * H, list(range(H)), H, q, cache, table, seq_lens,
                                       kv_heads=torch.arange(H) // (H // HKV), num_layer_kv_heads=HKV,
                                       scale=1 / math.sqrt(D), hip_state=state, step=step, max_seq_len=max(lens))
    return sel, keys, cache, table, seq_lens, q


@FAST
@given(st.lists(st.integers(1, 300), min_size=1, max_size=3), st.integers(0, 999), st.sampled_from(SPECS))
def test_a_full_run_is_the_one_query_prefill_index(lens, seed, spec):
    sel, keys, _, _, seq_lens, q = decode(spec, lens, seed)
    assert bool((sel.mode == DecodeMode.POSITIONS).all())
    mask = sel.to_dense_mask(seq_lens)
    for r, n in enumerate(lens):
        inp = PrefillInputs(heads=list(range(H)), num_layer_heads=H, num_layer_kv_heads=HKV, q_offset=n - 1, q_len=1,
                            total_len=n, q=q[r][None], k=keys[r, :n], kv_heads=torch.arange(H) // (H // HKV))
        want = build_prefill(spec, inp).to_dense_mask()[:, 0]  # [H, n]
        assert torch.equal(mask[r, :, :n], want), f"request {r}"
        pos = sel.indices[r, :, : int(sel.count[r].max())]
        for h in range(H):
            picked = sel.indices[r, h, : sel.count[r, h]].tolist()
            assert picked == sorted(set(picked)) and n - 1 in picked
        assert pos.shape[-1] <= spec.sink + spec.window + spec.stages[-1].budget


def test_stages_are_reused_between_refreshes_and_attention_matches_the_masked_reference():
    spec = SPECS[0]
    lens = [200, 260]
    state = HipDecodeState(spec, max_slots=4, num_heads=H)
    seen = []
    for step in range(6):  # the cache grows by one token per step
        cur = [n + step for n in lens]
        sel, keys, cache, table, seq_lens, q = decode(spec, cur, seed=step, state=state, step=step)
        state.step_done()
        seen.append([u.clone() for u in state.units])
        if step == 0:  # fresh state: a full run, equal to the stateless selection
            alone, *_ = decode(spec, cur, seed=step)
            assert torch.equal(sel.to_dense_mask(seq_lens), alone.to_dense_mask(seq_lens))
        elif step % 4 and step % 2:  # no stage refreshes: the last stage's units are reused
            assert torch.equal(seen[-1][1], seen[-2][1]) and torch.equal(seen[-1][0], seen[-2][0])
        elif step % 4:  # only the fine stage re-ran, from the cached coarse stage
            assert torch.equal(seen[-1][0], seen[-2][0])
        v = torch.randn_like(cache)
        out = sparse_decode_torch(q, cache, v, table, seq_lens, sel, 1 / math.sqrt(D))
        ref, _ = decode_attention_reference(q, cache, v, table, seq_lens, sel.to_dense_mask(seq_lens), 1 / math.sqrt(D))
        torch.testing.assert_close(out.float(), ref, rtol=1e-5, atol=1e-5)
        mask = sel.to_dense_mask(seq_lens)
        for r, n in enumerate(cur):  # sink and window are always read, whatever was cached
            assert bool(mask[r, :, :spec.sink].all()) and bool(mask[r, :, n - spec.window:n].all())
