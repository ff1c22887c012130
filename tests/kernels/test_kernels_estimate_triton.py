"""Triton estimation kernels against the torch estimation code they replace on CUDA."""

from __future__ import annotations

import pytest
import torch
from kernels_testlib import paged_cache

from headwise.kernels import estimate

# score sums over O(100) probes/keys in a different order: ~1e-7 relative in fp32
SCORE_ATOL = 1e-5


@pytest.mark.parametrize("h,hkv,d,dtype", [(6, 2, 64, torch.float32), (4, 1, 128, torch.bfloat16)])
@pytest.mark.parametrize("size", ["small", pytest.param("full", marks=pytest.mark.gpu)])
def test_vertical_slash_scores(triton_kernels, device, h, hkv, d, dtype, size):
    est = triton_kernels[2]
    s, probes = (100, 16) if size == "small" else (20000, 64)
    g = torch.Generator().manual_seed(d)
    q = torch.randn(probes, h, d, generator=g).to(dtype).to(device)
    k = torch.randn(s, hkv, d, generator=g).to(dtype).to(device)
    kv_heads = torch.arange(h, device=device) // (h // hkv)
    q_pos = torch.arange(s - probes, s, device=device)
    vert, slash = est.vertical_slash_scores(q, k, kv_heads, q_pos)
    ref_v, ref_s = (x.to(device) for x in estimate.vertical_slash_scores(q.cpu(), k.cpu(), kv_heads.cpu(), q_pos.cpu()))
    assert torch.allclose(vert, ref_v, atol=SCORE_ATOL) and torch.allclose(slash, ref_s, atol=SCORE_ATOL)
    # each probe's probabilities sum to one: the column and the diagonal sums both add up to L
    assert torch.allclose(vert.sum(-1), torch.full((h,), float(probes), device=device), rtol=1e-5)


@pytest.mark.parametrize("size", ["small", pytest.param("full", marks=pytest.mark.gpu)])
def test_decode_scores_and_page_min_max(triton_kernels, device, size):
    est = triton_kernels[2]
    lens = [37, 1, 100] if size == "small" else [5000, 1, 16384]
    hkv, d, bs = 2, 64, 16
    g = torch.Generator().manual_seed(1)
    ks = [torch.randn(n, hkv, d, generator=g) for n in lens]
    kc, _, table = paged_cache(ks, ks, bs, seed=2)
    q = torch.randn(len(lens), 3, d, generator=g)
    kv_heads = torch.tensor([0, 1, 1])  # a head subset that is not whole groups
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    got = est.decode_scores(q.to(device), kc.to(device), table.to(device), seq_lens.to(device), kv_heads.to(device))
    ref = estimate.decode_scores(q, kc, table, seq_lens, kv_heads)
    assert torch.equal(torch.isinf(got.cpu()), torch.isinf(ref))
    assert torch.allclose(got.cpu().nan_to_num(neginf=0.0), ref.nan_to_num(neginf=0.0), atol=SCORE_ATOL)
    for page in (8, 16, 32):  # smaller than, equal to and larger than the cache block
        kmin, kmax = est.page_min_max(kc.to(device), table.to(device), seq_lens.to(device), page)
        rmin, rmax = estimate.page_min_max(kc, table, seq_lens, page)
        assert torch.equal(kmin.cpu(), rmin) and torch.equal(kmax.cpu(), rmax)
