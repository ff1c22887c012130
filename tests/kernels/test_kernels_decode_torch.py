"""The torch paged sparse decode against the dense-masked fp32 reference."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_testlib import FP32_ATOL, LSE_ATOL, assert_lse_close, paged_cache, random_selection

from headwise.kernels import (DecodeMode, DecodeSelection, decode_attention_reference, sparse_decode,
                              sparse_decode_torch)
from headwise.kernels.decode import shared_by_group


def _batch(seq_lens, hq, hkv, d, block_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in seq_lens]
    vs = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in seq_lens]
    k_cache, v_cache, table = paged_cache(ks, vs, block_size, seed=seed)
    q = torch.randn(len(seq_lens), hq, d, generator=g).to(dtype)
    return q, k_cache, v_cache, table, torch.tensor(seq_lens, dtype=torch.int32)


@settings(max_examples=40, deadline=None)
@given(
    seq_lens=st.lists(st.integers(1, 90), min_size=1, max_size=3),
    gqa=st.sampled_from([(2, 2), (3, 1), (4, 1), (8, 2)]),  # GQA ratios 1, 3, 4, 4 with 2 KV heads
    shared=st.booleans(),  # selection per KV head (shared by the group) or per query head
    block_size=st.sampled_from([4, 16]),
    d=st.sampled_from([64, 128]),
    seed=st.integers(0, 10_000),
)
def test_decode_selection_matches_reference(seq_lens, gqa, shared, block_size, d, seed):
    hq, hkv = gqa
    q, kc, vc, table, lens = _batch(seq_lens, hq, hkv, d, block_size, torch.float32, seed)
    sel = random_selection(random.Random(seed), len(seq_lens), hkv if shared else hq, seq_lens, block_size, k_max=7)
    out, lse = sparse_decode_torch(q, kc, vc, table, lens, sel, return_lse=True)
    ref, ref_lse = decode_attention_reference(q, kc, vc, table, lens, sel.to_dense_mask(lens))
    assert float((out - ref).abs().max()) <= FP32_ATOL
    assert_lse_close(lse, ref_lse, torch.float32)


@pytest.mark.parametrize("mode", list(DecodeMode))
def test_each_mode_bf16(mode):
    # one mode at a time, bf16 cache: same tolerance rule as prefill (output rounding + exact products)
    seq_lens = [37, 100, 5]
    q, kc, vc, table, lens = _batch(seq_lens, 8, 2, 64, 16, torch.bfloat16, seed=int(mode))
    sel = random_selection(random.Random(3), 3, 8, seq_lens, 16, k_max=6, modes=[mode])
    out, lse = sparse_decode(q, kc, vc, table, lens, sel, return_lse=True)
    ref, ref_lse = decode_attention_reference(q, kc, vc, table, lens, sel.to_dense_mask(lens))
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).abs().max()) <= 2.0**-7 * float(ref.abs().max())
    assert_lse_close(lse, ref_lse, torch.bfloat16)


def test_one_token_selection_returns_that_value():
    # POSITIONS with a single token: softmax over one key is exactly that key's value
    seq_lens = [50]
    q, kc, vc, table, lens = _batch(seq_lens, 4, 1, 64, 16, torch.float32, seed=1)
    sel = DecodeSelection.uniform(1, 1, DecodeMode.POSITIONS, indices=torch.tensor([[[33]]]))
    out, lse = sparse_decode_torch(q, kc, vc, table, lens, sel, return_lse=True)
    blk, off = int(table[0, 33 // 16]), 33 % 16
    expected = vc[blk, 0, off].expand(4, -1)
    assert torch.allclose(out[0], expected, atol=1e-6)
    score = (q[0] @ kc[blk, 0, off]) / 8.0
    assert torch.allclose(lse[0], score, atol=1e-5)


def test_empty_selection_and_positions_past_the_end():
    # count 0 -> no key (out 0, lse -inf); positions >= seq_len are ignored
    seq_lens = [20, 20]
    q, kc, vc, table, lens = _batch(seq_lens, 2, 2, 64, 16, torch.float32, seed=2)
    idx = torch.tensor([[[3, 25], [0, 0]], [[19, 30], [0, 0]]], dtype=torch.int32)
    count = torch.tensor([[2, 0], [2, 0]], dtype=torch.int32)
    sel = DecodeSelection(torch.full((2, 2), int(DecodeMode.POSITIONS)), torch.zeros(2, 2), torch.zeros(2, 2), idx, count)
    out, lse = sparse_decode_torch(q, kc, vc, table, lens, sel, return_lse=True)
    assert bool(torch.isinf(lse[:, 1]).all()) and float(out[:, 1].abs().max()) == 0.0
    ref, ref_lse = decode_attention_reference(q, kc, vc, table, lens, sel.to_dense_mask(lens))
    assert float((out - ref).abs().max()) <= FP32_ATOL
    assert float((lse[:, 0] - ref_lse[:, 0]).abs().max()) <= LSE_ATOL[torch.float32]


def test_decode_errors_name_what_was_wrong():
    q, kc, vc, table, lens = _batch([10], 4, 2, 64, 16, torch.float32, seed=0)
    sel = DecodeSelection.uniform(1, 3, DecodeMode.DENSE)
    with pytest.raises(ValueError, match="expected \\[1, 4 \\(query heads\\) or 2"):
        sparse_decode_torch(q, kc, vc, table, lens, sel)


@pytest.mark.parametrize("mode", list(DecodeMode))
def test_group_shared_selection_on_query_heads(mode):
    # identical entries for every query head of a GQA group (dense, window, static layers) are
    # served as one shared row per group: same results as the reference, on the KV-head axis
    seq_lens = [70, 33]
    hq, hkv = 6, 2
    q, kc, vc, table, lens = _batch(seq_lens, hq, hkv, 64, 16, torch.float32, seed=4)
    per_kv = random_selection(random.Random(int(mode)), 2, hkv, seq_lens, 16, k_max=5, modes=[mode])
    rep = lambda t: t.repeat_interleave(hq // hkv, dim=1)  # noqa: E731
    sel = DecodeSelection(rep(per_kv.mode), rep(per_kv.sink), rep(per_kv.window), rep(per_kv.indices),
                          rep(per_kv.count), per_kv.block_size)
    assert shared_by_group(sel, hkv).num_heads == hkv
    out, lse = sparse_decode_torch(q, kc, vc, table, lens, sel, return_lse=True)
    ref, ref_lse = decode_attention_reference(q, kc, vc, table, lens, sel.to_dense_mask(lens))
    assert float((out - ref).abs().max()) <= FP32_ATOL
    assert_lse_close(lse, ref_lse, torch.float32)


def test_group_with_differing_heads_is_not_shared():
    # one query head of group 1 reads a different window: the selection stays per query head
    sel = DecodeSelection.uniform(1, 4, DecodeMode.WINDOW, sink=2, window=8)
    sel.window[0, 3] = 5
    assert shared_by_group(sel, 2).num_heads == 4
    # differences in fields a mode ignores do not matter (window data of a DENSE row)
    dense = DecodeSelection.uniform(1, 4, DecodeMode.DENSE)
    dense.window[0, 1] = 7
    assert shared_by_group(dense, 2).num_heads == 2
