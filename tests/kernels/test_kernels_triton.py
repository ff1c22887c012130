"""Triton prefill and decode kernels against the dense-masked reference and the torch path.

Without a GPU they run in Triton's interpreter at small shapes (slow: keep cases few and small);
the ``gpu``-marked cases repeat them at serving sizes on CUDA (``pytest -m gpu``).
"""

from __future__ import annotations

import random

import pytest
import torch
from kernels_testlib import (assert_lse_close, assert_out_close, paged_cache, qkv, random_index,
                             random_selection, torch_bf16_error)

from headwise.kernels import (DecodeMode, DecodeSelection, SparseIndex, decode_attention_reference,
                              masked_attention_reference, sparse_decode_torch)
from headwise.kernels.varlen import VarlenIndex, VarlenLayout, sparse_prefill_varlen_paged_torch, sparse_prefill_varlen_torch

# (Hq, Hkv, D, dtype): every GQA ratio (1, 3, 4, 8), both head dims, both dtypes, in few launches
PREFILL_CASES = [
    (4, 4, 64, torch.float32),
    (6, 2, 128, torch.bfloat16),  # ratio 3
    (8, 2, 64, torch.bfloat16),  # ratio 4
    (8, 1, 128, torch.float32),  # ratio 8
]
# (q_len, q_offset) of the requests packed in one launch: an odd first chunk, a one-query chunk
# at an offset, a later chunk with an unaligned offset and a ragged last block
SMALL_BATCH = [(70, 0), (1, 40), (100, 53)]
FULL_BATCH = [(1000, 0), (1, 4000), (2048, 3000), (513, 77)]


def _batch_inputs(batch, hq, hkv, d, dtype, dev, seed, empty_block=True):
    idxs, qs, ks, vs = [], [], [], []
    for r, (q_len, off) in enumerate(batch):
        idx = random_index(hq, q_len, off, seed=seed + r, empty_block=empty_block and r == 2,
                           max_ranges=6 if q_len > 500 else 3, max_cols=40 if q_len > 500 else 10)
        q, k, v = qkv(q_len, off + q_len, hq, hkv, d, dtype, seed=seed + 100 + r)
        idxs.append(idx)
        qs.append(q)
        ks.append(k)
        vs.append(v)
    return idxs, [x.to(dev) for x in qs], [x.to(dev) for x in ks], [x.to(dev) for x in vs]


def _check_prefill(out, lse, idxs, qs, ks, vs, dtype):
    row = 0
    for idx, q, k, v in zip(idxs, qs, ks, vs):
        n = q.shape[0]
        mask = idx.to(q.device).to_dense_mask()
        ref, ref_lse = masked_attention_reference(q, k, v, mask)
        err = torch_bf16_error(q, k, v, mask, ref) if dtype != torch.float32 else 0.0
        assert_out_close(out[row:row + n], ref, dtype, err)
        assert_lse_close(lse[:, row:row + n], ref_lse, dtype)
        row += n


def _run_prefill(triton_kernels, device, hq, hkv, d, dtype, batch):
    prefill = triton_kernels[0]
    idxs, qs, ks, vs = _batch_inputs(batch, hq, hkv, d, dtype, device, seed=hq * 10 + d)
    packed = VarlenIndex.pack(idxs, device)
    q = torch.cat(qs)
    # contiguous K/V, packed back to back
    k, v = torch.cat(ks), torch.cat(vs)
    starts = [0]
    for kk in ks[:-1]:
        starts.append(starts[-1] + kk.shape[0])
    out, lse = prefill.sparse_prefill_varlen_triton(q, k, v, starts, packed, return_lse=True)
    _check_prefill(out, lse, idxs, qs, ks, vs, dtype)
    # the torch path agrees on the same packed batch
    t_out, t_lse = sparse_prefill_varlen_torch(q.cpu(), k.cpu(), v.cpu(), starts, VarlenIndex.pack(idxs, "cpu"),
                                               return_lse=True)
    assert_lse_close(lse.cpu(), t_lse, dtype)
    # the same batch read through a paged cache
    kc, vc, table = paged_cache([x.cpu() for x in ks], [x.cpu() for x in vs], block_size=16, seed=5)
    out_p, lse_p = prefill.sparse_prefill_varlen_paged_triton(q, kc.to(device), vc.to(device), table.to(device),
                                                               packed, return_lse=True)
    _check_prefill(out_p, lse_p, idxs, qs, ks, vs, dtype)


@pytest.mark.parametrize("hq,hkv,d,dtype", PREFILL_CASES)
def test_prefill_varlen_small(triton_kernels, device, hq, hkv, d, dtype):
    _run_prefill(triton_kernels, device, hq, hkv, d, dtype, SMALL_BATCH)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d,dtype", PREFILL_CASES + [(32, 8, 128, torch.float16)])
def test_prefill_varlen_full(triton_kernels, device, hq, hkv, d, dtype):
    _run_prefill(triton_kernels, device, hq, hkv, d, dtype, FULL_BATCH)


def test_prefill_varlen_writes_chunks_in_place_and_leaves_other_rows(triton_kernels, device):
    """A step's layout: chunks at their rows of the step's q (other rows in between, e.g. decode or
    dense rows run elsewhere), each reading its own block-table row; out given, written in place."""
    prefill = triton_kernels[0]
    hq, hkv, d, dtype = 6, 2, 64, torch.float32
    idxs, qs, ks, vs = _batch_inputs(SMALL_BATCH, hq, hkv, d, dtype, "cpu", seed=21)
    gaps = [3, 5, 2]  # rows of other work before each chunk
    starts, row = [], 0
    for gap, q in zip(gaps, qs):
        starts.append(row + gap)
        row += gap + q.shape[0]
    reqs = [2, 0, 1]  # chunk r reads block-table row reqs[r]
    kc, vc, table = paged_cache([ks[reqs.index(i)] for i in range(3)], [vs[reqs.index(i)] for i in range(3)],
                                block_size=16, seed=7)
    q = torch.randn(row + 4, hq, d, dtype=dtype)
    for s0, qq in zip(starts, qs):
        q[s0:s0 + qq.shape[0]] = qq
    layout = VarlenLayout.of([x.q_len for x in idxs], [x.q_offset for x in idxs], starts, reqs, device=device)
    packed = VarlenIndex.pack([x.to(device) for x in idxs], layout=layout)
    out = torch.full_like(q, 7.0).to(device)
    got = prefill.sparse_prefill_varlen_paged_triton(q.to(device), kc.to(device), vc.to(device), table.to(device),
                                                     packed, out=out)
    assert got is out
    want = sparse_prefill_varlen_paged_torch(q, kc, vc, table, VarlenIndex.pack(idxs, layout=layout.to("cpu")),
                                             out=torch.full_like(q, 7.0))
    covered = torch.zeros(q.shape[0], dtype=torch.bool)
    for s0, qq in zip(starts, qs):
        covered[s0:s0 + qq.shape[0]] = True
    assert torch.all(out.cpu()[~covered] == 7.0)  # rows of other work untouched
    assert_out_close(out.cpu()[covered], want[covered], dtype)
    for s0, idx, qq, k, v in zip(starts, idxs, qs, ks, vs):
        ref, _ = masked_attention_reference(qq, k, v, idx.to_dense_mask())
        assert_out_close(out.cpu()[s0:s0 + qq.shape[0]], ref, dtype)


def test_prefill_single_request_entry_points(triton_kernels, device):
    prefill = triton_kernels[0]
    idx = SparseIndex.cat_heads([SparseIndex.dense(2, 65, 10), random_index(2, 65, 10, seed=3)])
    q, k, v = (x.to(device) for x in qkv(65, 75, 4, 2, 64, torch.float32, seed=4))
    out, lse = prefill.sparse_prefill_triton(q, k, v, idx, return_lse=True)
    ref, ref_lse = masked_attention_reference(q, k, v, idx.to(device).to_dense_mask())
    assert_out_close(out, ref, torch.float32)
    assert_lse_close(lse, ref_lse, torch.float32)
    into = torch.full_like(q, float("nan"))  # the transformers path's chunks write into its output
    assert prefill.sparse_prefill_triton(q, k, v, idx, out=into).data_ptr() == into.data_ptr()
    assert_out_close(into, ref, torch.float32)
    kc, vc, table = paged_cache([k.cpu()], [v.cpu()], 32, seed=1)
    out = prefill.sparse_prefill_paged_triton(q, kc.to(device), vc.to(device), table[0].to(device), idx)
    assert_out_close(out, ref, torch.float32)


# (Hq, Hkv, shared, D, dtype, splits): per-query-head and group-shared selections, every GQA
# ratio, one split and several (the merge), both dtypes and head dims
DECODE_CASES = [
    (4, 4, False, 64, torch.float32, 1),
    (3, 1, True, 128, torch.bfloat16, 3),
    (8, 2, True, 64, torch.float32, 4),
    (8, 1, False, 64, torch.bfloat16, 2),
]


def _run_decode(triton_kernels, device, hq, hkv, shared, d, dtype, splits, seq_lens, block_size, k_max):
    decode = triton_kernels[1]
    g = torch.Generator().manual_seed(hq + d)
    ks = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in seq_lens]
    vs = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in seq_lens]
    kc, vc, table = paged_cache(ks, vs, block_size, seed=hq)
    q = torch.randn(len(seq_lens), hq, d, generator=g).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    sel = random_selection(random.Random(d), len(seq_lens), hkv if shared else hq, seq_lens, block_size, k_max)
    out, lse = decode.sparse_decode_triton(q.to(device), kc.to(device), vc.to(device), table.to(device),
                                           lens.to(device), sel.to(device), return_lse=True, num_splits=splits)
    ref, ref_lse = decode_attention_reference(q, kc, vc, table, lens, sel.to_dense_mask(lens))
    tol = 0.0 if dtype == torch.float32 else 2.0**-8 * float(ref.abs().max())  # one bf16 rounding
    assert_out_close(out.cpu(), ref, dtype, tol)
    assert_lse_close(lse.cpu(), ref_lse, dtype)
    t_out, t_lse = sparse_decode_torch(q, kc, vc, table, lens, sel, return_lse=True)
    assert_lse_close(lse.cpu(), t_lse, dtype)


@pytest.mark.parametrize("hq,hkv,shared,d,dtype,splits", DECODE_CASES)
def test_decode_small(triton_kernels, device, hq, hkv, shared, d, dtype, splits):
    _run_decode(triton_kernels, device, hq, hkv, shared, d, dtype, splits, [37, 1, 100], 16, k_max=6)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,shared,d,dtype,splits", DECODE_CASES)
def test_decode_full(triton_kernels, device, hq, hkv, shared, d, dtype, splits):
    _run_decode(triton_kernels, device, hq, hkv, shared, d, dtype, splits * 4, [5000, 1, 16384, 777], 16, k_max=300)


def test_decode_one_token_and_empty(triton_kernels, device):
    # one selected token returns exactly its value; an empty selection returns 0 / -inf
    decode = triton_kernels[1]
    ks = [torch.randn(50, 1, 64)]
    vs = [torch.randn(50, 1, 64)]
    kc, vc, table = paged_cache(ks, vs, 16, seed=2)
    q = torch.randn(1, 2, 64)
    idx = torch.tensor([[[33], [0]]], dtype=torch.int32)
    sel = DecodeSelection(torch.full((1, 2), int(DecodeMode.POSITIONS)), torch.zeros(1, 2), torch.zeros(1, 2),
                          idx, torch.tensor([[1, 0]]))
    out, lse = decode.sparse_decode_triton(q.to(device), kc.to(device), vc.to(device), table.to(device),
                                           torch.tensor([50], device=device), sel.to(device), return_lse=True)
    assert torch.allclose(out[0, 0].cpu(), vs[0][33, 0], atol=1e-5)
    assert float(out[0, 1].abs().max()) == 0.0 and bool(torch.isinf(lse[0, 1]))
