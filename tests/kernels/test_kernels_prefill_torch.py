"""The torch sparse prefill (CPU path and oracle) against the dense-masked fp32 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernels_testlib import (assert_lse_close, assert_out_close, paged_cache, qkv, random_index,
                             structured_index, torch_bf16_error)

from headwise.kernels import (SparseIndex, masked_attention_reference, sparse_prefill, sparse_prefill_paged,
                              sparse_prefill_paged_torch, sparse_prefill_torch)
from headwise.kernels.prefill_plan import (band_chunk, far_keys, head_sets, nested_far, own_range, plan_heads,
                                           prefix_chunks)

# (Hq, Hkv): GQA ratios 1 (MHA), 3 (SmolLM2: 9/3), 4 (Llama-3 8B: 32/8), 8 (70B-like group)
GQA = [(4, 4), (9, 3), (8, 2), (8, 1)]
# (q_len, q_offset): an odd length that leaves a ragged last block; an exact multiple of 64;
# a later chunk of a chunked prefill (offset not a multiple of 64); a single-query chunk
SHAPES = [(77, 0), (128, 0), (70, 53), (1, 40)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("q_len,q_offset", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_matches_masked_reference(hq, hkv, q_len, q_offset, dtype):
    d = 64 if hq % 3 else 128  # both head dims appear across the GQA axis
    idx = random_index(hq, q_len, q_offset, seed=hq * 1000 + q_len + q_offset)
    q, k, v = qkv(q_len, q_offset + q_len, hq, hkv, d, dtype, seed=7)
    out, lse = sparse_prefill_torch(q, k, v, idx, return_lse=True)
    mask = idx.to_dense_mask()
    ref, ref_lse = masked_attention_reference(q, k, v, mask)
    assert out.dtype == dtype and out.shape == q.shape
    assert_out_close(out, ref, dtype, torch_bf16_error(q, k, v, mask, ref) if dtype != torch.float32 else 0.0)
    assert_lse_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("d", [64, 128])
def test_empty_block_gives_zero_and_minus_inf(d):
    idx = random_index(6, 200, 30, seed=3, empty_block=True)
    q, k, v = qkv(200, 230, 6, 2, d, torch.float32, seed=1)
    out, lse = sparse_prefill_torch(q, k, v, idx, return_lse=True)
    block = idx.num_q_blocks // 2
    rows = slice(block * 64, (block + 1) * 64)
    assert bool(torch.isinf(lse[:, rows]).all()) and float(out[rows].abs().max()) == 0.0
    ref, ref_lse = masked_attention_reference(q, k, v, idx.to_dense_mask())
    assert_out_close(out, ref, torch.float32)
    assert_lse_close(lse, ref_lse, torch.float32)


def test_columns_only_and_ranges_past_the_horizon():
    # block 0 names keys far in its future (must be cut by causality); block 1 only columns
    q_len, off = 128, 16
    ranges = [[[(0, 144)], []]]
    cols = [[[], [0, 5, 100, 143]]]
    idx = SparseIndex.from_lists(ranges, cols, q_len, off)
    q, k, v = qkv(q_len, off + q_len, 1, 1, 64, torch.float32, seed=5)
    out, lse = sparse_prefill_torch(q, k, v, idx, return_lse=True)
    ref, ref_lse = masked_attention_reference(q, k, v, idx.to_dense_mask())
    assert_out_close(out, ref, torch.float32)
    assert_lse_close(lse, ref_lse, torch.float32)


@pytest.mark.parametrize("q_offset", [0, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_index_equals_sdpa(q_offset, dtype):
    q_len, hq, hkv, d = 150, 8, 2, 64
    q, k, v = qkv(q_len, q_offset + q_len, hq, hkv, d, dtype, seed=11)
    out = sparse_prefill(q, k, v, SparseIndex.dense(hq, q_len, q_offset))
    # SDPA's own causal mask is top-left aligned, so spell out the offset one
    causal = torch.arange(q_offset + q_len)[None, :] <= (q_offset + torch.arange(q_len))[:, None]
    sdpa = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
        attn_mask=causal, enable_gqa=True).transpose(0, 1)
    torch_err = 0.0
    if dtype != torch.float32:
        low = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=causal, enable_gqa=True).transpose(0, 1)
        torch_err = float((low.float() - sdpa).abs().max())
    assert_out_close(out, sdpa, dtype, torch_err)


def test_mixed_dense_and_sparse_heads_and_strided_kv():
    # heads 0-2 dense (fast path), 3-5 sparse; K/V are strided views of a fused qkv tensor
    q_len, off, hq, hkv, d = 100, 20, 6, 2, 64
    sparse = random_index(3, q_len, off, seed=9)
    idx = SparseIndex.cat_heads([SparseIndex.dense(3, q_len, off), sparse])
    g = torch.Generator().manual_seed(2)
    fused = torch.randn(off + q_len, hkv, 3 * d, generator=g)
    k, v = fused[..., d:2 * d], fused[..., 2 * d:]
    q = torch.randn(q_len, hq, d, generator=g)
    out, lse = sparse_prefill_torch(q, k, v, idx, return_lse=True)
    ref, ref_lse = masked_attention_reference(q, k, v, idx.to_dense_mask())
    assert_out_close(out, ref, torch.float32)
    assert_lse_close(lse, ref_lse, torch.float32)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_matches_masked_reference(block_size, dtype):
    q_len, off, hq, hkv, d = 90, 45, 8, 2, 128
    idx = SparseIndex.cat_heads([random_index(6, q_len, off, seed=4), SparseIndex.dense(2, q_len, off)])
    q, k, v = qkv(q_len, off + q_len, hq, hkv, d, dtype, seed=3)
    k_cache, v_cache, table = paged_cache([k], [v], block_size, seed=8)
    out, lse = sparse_prefill_paged(q, k_cache, v_cache, table[0], idx, return_lse=True)
    mask = idx.to_dense_mask()
    ref, ref_lse = masked_attention_reference(q, k, v, mask)
    assert_out_close(out, ref, dtype, torch_bf16_error(q, k, v, mask, ref) if dtype != torch.float32 else 0.0)
    assert_lse_close(lse, ref_lse, dtype)


def test_custom_scale_is_used():
    idx = random_index(2, 64, 0, seed=1)
    q, k, v = qkv(64, 64, 2, 1, 64, torch.float32, seed=2)
    out, lse = sparse_prefill_torch(q, k, v, idx, scale=0.3, return_lse=True)
    ref, ref_lse = masked_attention_reference(q, k, v, idx.to_dense_mask(), scale=0.3)
    assert_out_close(out, ref, torch.float32)
    assert_lse_close(lse, ref_lse, torch.float32)


def test_errors_name_what_was_wrong():
    idx = SparseIndex.dense(4, 10)
    q, k, v = qkv(10, 10, 4, 2, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match="expected \\[10"):
        sparse_prefill_torch(q, k[:9], v[:9], idx)
    with pytest.raises(ValueError, match="one per query head"):
        sparse_prefill_torch(q, k, v, SparseIndex.dense(2, 10))
    with pytest.raises(ValueError, match="not a multiple"):
        sparse_prefill_torch(q[:, :3], k, v, SparseIndex.dense(3, 10))
    kc, vc, table = paged_cache([k], [v], 4, seed=0, spare_blocks=0)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        sparse_prefill_paged_torch(q, kc, vc, table[0, :2], idx)


# Every row kind and part of the CPU path (see kernels/prefill_plan.py), on indices shaped like the
# pattern families: identical heads stacked (a_shape, strided), per-head sets sharing a band
# (vslash, columns, blocks), nested far keys (sinks, columns, shards), non-nested ones (shifting
# diagonals, random blocks), dense prefixes, wide bands read several blocks per call.
KINDS = ["a_shape", "a_shape_wide", "vslash", "columns", "blocks", "strided"]
# (q_len, q_offset): whole blocks from 0; a later chunk with a ragged last block
STRUCTURED_SHAPES = [(768, 0), (600, 130)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("q_len,q_offset", STRUCTURED_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_structured_patterns_match_reference(kind, q_len, q_offset, dtype):
    hq, hkv = 9, 3
    idx = structured_index(kind, hq, q_len, q_offset, seed=q_len + q_offset, group=hq // hkv)
    q, k, v = qkv(q_len, q_offset + q_len, hq, hkv, 64, dtype, seed=len(kind))
    out, lse = sparse_prefill_torch(q, k, v, idx, return_lse=True)
    mask = idx.to_dense_mask()
    ref, ref_lse = masked_attention_reference(q, k, v, mask)
    assert_out_close(out, ref, dtype, torch_bf16_error(q, k, v, mask, ref) if dtype != torch.float32 else 0.0)
    assert_lse_close(lse, ref_lse, dtype)


def test_mixed_families_in_one_gqa_group():
    # group 0: two identical a_shape heads + a vslash head; group 1: columns, blocks, strided
    q_len, off, hq, hkv = 700, 90, 6, 2
    kinds = ["a_shape", "a_shape", "vslash", "columns", "blocks", "strided"]
    parts = [structured_index(kd, hq, q_len, off, seed=5, group=3).select_heads([h]) for h, kd in enumerate(kinds)]
    idx = SparseIndex.cat_heads(parts)
    q, k, v = qkv(q_len, off + q_len, hq, hkv, 64, torch.float32, seed=6)
    out, lse = sparse_prefill_torch(q, k, v, idx, return_lse=True)
    ref, ref_lse = masked_attention_reference(q, k, v, idx.to_dense_mask())
    assert_out_close(out, ref, torch.float32)
    assert_lse_close(lse, ref_lse, torch.float32)


def test_planner_finds_the_structure():
    # what makes the CPU path fast must be recognised; a regression to the generic per-row path
    # would still be correct, so it is checked here rather than through timings
    a = structured_index("a_shape", 6, 640, 0, seed=1, group=3)  # sink 32 + window 150
    avail, dense = own_range(a)
    assert head_sets(a, 3) == [[0, 1, 2], [3, 4, 5]]  # identical heads stack
    p = plan_heads(a, [0, 1, 2], 3, avail, dense, allow_dense=True)
    # blocks 0-2 keep every causal key (window reaches the sink): dense prefix; then band 149
    assert (p.dense_rows, p.band) == (3, 149)
    assert bool(p.regular[3:].all()) and not bool(p.short.any() | p.broken.any())
    assert band_chunk(1023, 100, 3, 64) > 1 and band_chunk(63, 100, 1, 64) == 1
    # under a pair budget the chunk's band mask stays within it; one block per call when even two overflow
    for band, budget in [(1023, 1 << 18), (1023, 1 << 22), (16384, 1 << 22), (16384, 1 << 20)]:
        k = band_chunk(band, 100, 3, 64, budget)
        assert k == 1 or 3 * k * 64 * (band + k * 64) <= budget
    assert band_chunk(16384, 100, 3, 64, 1 << 22) == 1
    assert band_chunk(1023, 100, 3, 64, 1 << 18) < band_chunk(1023, 100, 3, 64)
    # sinks and vertical columns are nested (each block sees a prefix of one key list);
    # diagonals far from the main one shift with the block, so they are not
    for kind, nested in [("a_shape", True), ("columns", True), ("strided", True), ("vslash", False)]:
        idx = structured_index(kind, 3, 640, 0, seed=2, group=3)
        av, dn = own_range(idx)
        q = plan_heads(idx, [0], 3, av, dn, allow_dense=True)
        rows = torch.nonzero(q.far_start > 0).view(-1)
        keys = far_keys(idx, 0, rows, q.far_start[rows])
        n_far = (keys < 2**62).sum(1)
        rows, n_far = rows[n_far > 0], n_far[n_far > 0]
        assert (nested_far(idx, 0, rows, q.far_start[rows], n_far) is not None) == nested, kind


def test_prefix_chunks_cover_every_row_once():
    m = [0, 3, 3, 50, 51, 52, 400, 401, 5, 5]
    seen = []
    for i, j, w in prefix_chunks(m, per_query_budget=1000):
        assert w == max(1, max(m[i:j])) and (j - i) * w <= 1000 or j - i == 1
        seen.extend(range(i, j))
    assert seen == list(range(len(m)))
    # short lists: the rows per run are capped on their own (queries, not pairs, fill memory)
    short = [4] * 50
    runs = list(prefix_chunks(short, per_query_budget=1 << 20, max_rows=8))
    assert [j - i for i, j, _ in runs] == [8] * 6 + [2]
    assert [j - i for i, j, _ in prefix_chunks(short, per_query_budget=1 << 20)] == [50]


@pytest.mark.parametrize("layout", ["key_major", "head_major", "one_kv_head"])
def test_keys_are_read_in_the_layout_they_come_in(layout):
    # key-major [S, Hkv, D] (the projection's and the transformers cache's order) and head-major
    # (a transposed view of [Hkv, S, D]) are read in place; a ragged last block's band windows
    # reach past the last key and read a zero-padded copy of just their span
    hq, hkv = (9, 3) if layout != "one_kv_head" else (4, 1)
    q_len, off = 600, 130
    idx = structured_index("a_shape_wide", hq, q_len, off, seed=4, group=hq // hkv)
    q, k, v = qkv(q_len, off + q_len, hq, hkv, 64, torch.float32, seed=6)
    if layout == "head_major":
        k, v = k.transpose(0, 1).contiguous().transpose(0, 1), v.transpose(0, 1).contiguous().transpose(0, 1)
    out, lse = sparse_prefill_torch(q, k, v, idx, return_lse=True)
    ref, ref_lse = masked_attention_reference(q, k, v, idx.to_dense_mask())
    assert_out_close(out, ref, torch.float32)
    assert_lse_close(lse, ref_lse, torch.float32)


def test_a_dense_tail_row_reads_its_long_far_span_as_a_view():
    # the last block keeps every key (a plan's dense tail) past SPAN_MIN far keys; the heads of one
    # group differ elsewhere (sink + window), so the row runs through the far part, not a dense prefix
    from headwise.kernels.prefill_far import SPAN_MIN

    q_len, off, bm = 320, SPAN_MIN + 200, 64
    s = off + q_len
    nqb = q_len // bm
    ranges = [[[(0, off + (b + 1) * bm)] if b == nqb - 1 else [(0, 16), (off + (b + 1) * bm - window, off + (b + 1) * bm)]
               for b in range(nqb)] for window in (128, 256)]
    idx = SparseIndex.from_lists(ranges, [[[] for _ in range(nqb)] for _ in ranges], q_len=q_len, q_offset=off)
    q, k, v = qkv(q_len, s, 2, 1, 64, torch.float32, seed=11)
    out, lse = sparse_prefill_torch(q, k, v, idx, return_lse=True)
    ref, ref_lse = masked_attention_reference(q, k, v, idx.to_dense_mask())
    assert_out_close(out, ref, torch.float32)
    assert_lse_close(lse, ref_lse, torch.float32)


@pytest.mark.parametrize("q_len", [128, 77])  # whole blocks (filled in place); a ragged last block (copied in)
def test_out_is_filled_in_place(q_len):
    idx = random_index(9, q_len, 40, seed=12)
    q, k, v = qkv(q_len, 40 + q_len, 9, 3, 64, torch.float32, seed=13)
    out = torch.full_like(q, float("nan"))
    got = sparse_prefill_torch(q, k, v, idx, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref, _ = masked_attention_reference(q, k, v, idx.to_dense_mask())
    assert_out_close(out, ref, torch.float32)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        sparse_prefill_torch(q, k, v, idx, out=out[:, :4])


@pytest.mark.parametrize("budgets", [(1 << 13, 1 << 13), (1 << 18, 1 << 9)], ids=["pairs", "queries"])
@pytest.mark.parametrize("kind", ["strided", "columns", "a_shape", "vslash", "blocks"])
def test_far_keys_past_the_pair_budget_run_in_slices(kind, budgets, monkeypatch):
    # "pairs": a budget this small puts a single row's far key list (shards, columns, sinks) past
    # it, so the nested far part gathers, masks and merges its keys slice by slice, one row per
    # call; "queries": many rows fit the pair budget but the query budget cuts them into short runs
    # (near rows too: band, diagonal and broken rows run a few at a time)
    import headwise.kernels.prefill_plan as prefill_plan

    monkeypatch.setattr(prefill_plan, "PAIR_BUDGET", budgets[0])
    monkeypatch.setattr(prefill_plan, "QUERY_BUDGET", budgets[1])
    hq, hkv = 9, 3
    idx = structured_index(kind, hq, 600, 130, seed=21, group=hq // hkv)
    q, k, v = qkv(600, 730, hq, hkv, 64, torch.float32, seed=22)
    out, lse = sparse_prefill_torch(q, k, v, idx, return_lse=True)
    ref, ref_lse = masked_attention_reference(q, k, v, idx.to_dense_mask())
    assert_out_close(out, ref, torch.float32)
    assert_lse_close(lse, ref_lse, torch.float32)
