"""Triton versions of the estimation maths in ``estimate.py`` (same signatures, same results).

* ``vertical_slash_scores``: MInference's probe estimate without the ``[H, L, S]`` probability
  tensor: a first kernel finds each probe's log-sum-exp over the keys, a second sums each key
  column's probability over the probes, a third sums each diagonal. Every output element is
  owned by one program and summed in a fixed order (no atomics), so the scores, and the top-k
  ranked from them, are identical from run to run.
* ``decode_scores`` (TidalDecode) and ``page_min_max`` (Quest) read K straight from the paged
  cache through the block table instead of gathering a contiguous copy of every request's keys.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


_LOG2E = 1.4426950408889634


@triton.jit
def _probe_scores(q, K, kpos, valid, g, stride_kt, stride_kh, offs_d, q_pos, qk_scale):
    # q: [L, D] probes; returns scores [L, BLOCK_N] in log2 units, -inf where not visible.
    # fp32 operands on purpose: these sums are ranked, and the torch version is fp32 too
    k = tl.load(K + kpos.to(tl.int64)[:, None] * stride_kt + g * stride_kh + offs_d[None, :],
                mask=valid[:, None], other=0.0)
    s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    visible = valid[None, :] & (kpos[None, :] <= q_pos[:, None])
    return tl.where(visible, s * qk_scale, float("-inf"))


@triton.jit
def _probe_lse_kernel(Q, K, KvHeads, QPos, Lse, S, qk_scale,
                      stride_ql, stride_qh, stride_kt, stride_kh, stride_lh,
                      L: tl.constexpr, L_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    h = tl.program_id(0)
    g = tl.load(KvHeads + h)
    offs_l = tl.arange(0, L_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    l_ok = offs_l < L
    q = tl.load(Q + offs_l[:, None] * stride_ql + h * stride_qh + offs_d[None, :], mask=l_ok[:, None], other=0.0)
    q_pos = tl.load(QPos + offs_l, mask=l_ok, other=-1)
    m_i = tl.full([L_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([L_PAD], dtype=tl.float32)
    for start in range(0, S, BLOCK_N):
        kpos = start + offs_n
        s = _probe_scores(q, K, kpos, kpos < S, g, stride_kt, stride_kh, offs_d, q_pos, qk_scale)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("inf"))  # inf: prob 0
    tl.store(Lse + h * stride_lh + offs_l, lse, mask=l_ok)


@triton.jit
def _vertical_kernel(Q, K, KvHeads, QPos, Lse, Vert, S, qk_scale,
                     stride_ql, stride_qh, stride_kt, stride_kh, stride_lh, stride_vh,
                     L: tl.constexpr, L_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    h = tl.program_id(0)
    tile = tl.program_id(1)
    g = tl.load(KvHeads + h)
    offs_l = tl.arange(0, L_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    l_ok = offs_l < L
    q = tl.load(Q + offs_l[:, None] * stride_ql + h * stride_qh + offs_d[None, :], mask=l_ok[:, None], other=0.0)
    q_pos = tl.load(QPos + offs_l, mask=l_ok, other=-1)
    lse = tl.load(Lse + h * stride_lh + offs_l, mask=l_ok, other=float("inf"))
    kpos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    s = _probe_scores(q, K, kpos, kpos < S, g, stride_kt, stride_kh, offs_d, q_pos, qk_scale)
    p = tl.exp2(s - lse[:, None])  # [L, BLOCK_N] probabilities
    tl.store(Vert + h * stride_vh + kpos, tl.sum(p, 0), mask=kpos < S)


@triton.jit
def _slash_kernel(Q, K, KvHeads, QPos, Lse, Slash, S, qk_scale,
                  stride_ql, stride_qh, stride_kt, stride_kh, stride_lh, stride_sh,
                  L: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    # program = (head, tile of diagonal offsets o); probe l reads keys q_pos[l] - o (a reversed run)
    h = tl.program_id(0)
    tile = tl.program_id(1)
    g = tl.load(KvHeads + h)
    offs_d = tl.arange(0, HEAD_DIM)
    o = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for l in range(0, L):
        q = tl.load(Q + l * stride_ql + h * stride_qh + offs_d).to(tl.float32)
        pos_l = tl.load(QPos + l)
        lse_l = tl.load(Lse + h * stride_lh + l)
        kpos = pos_l - o
        valid = (kpos >= 0) & (kpos < S) & (o < S)
        k = tl.load(K + kpos.to(tl.int64)[:, None] * stride_kt + g * stride_kh + offs_d[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1) * qk_scale
        acc += tl.where(valid, tl.exp2(s - lse_l), 0.0)
    tl.store(Slash + h * stride_sh + o, acc, mask=o < S)


def vertical_slash_scores(q_last, k, kv_heads, q_pos, scale=None):
    """Same contract as ``estimate.vertical_slash_scores``: ``(vertical [H, S], slash [H, S])`` fp32."""
    l_len, h, d = q_last.shape
    s = k.shape[0]
    if q_last.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("vertical_slash_scores (Triton): q_last and k need a unit-stride last dim")
    if d not in (64, 128):
        raise ValueError(f"vertical_slash_scores (Triton): head dim must be 64 or 128, got {d}")
    dev = q_last.device
    sc = (1.0 / math.sqrt(d) if scale is None else scale) * _LOG2E
    kvh = kv_heads.to(dev, torch.int32).contiguous()
    pos = q_pos.to(dev, torch.int32).contiguous()
    lse = torch.empty(h, l_len, dtype=torch.float32, device=dev)
    vert = torch.empty(h, s, dtype=torch.float32, device=dev)
    slash = torch.empty(h, s, dtype=torch.float32, device=dev)
    l_pad = max(16, triton.next_power_of_2(l_len))
    common = (q_last.stride(0), q_last.stride(1), k.stride(0), k.stride(1), lse.stride(0))
    _probe_lse_kernel[(h,)](q_last, k, kvh, pos, lse, s, sc, *common,
                            L=l_len, L_PAD=l_pad, BLOCK_N=64, HEAD_DIM=d)
    _vertical_kernel[(h, triton.cdiv(s, 64))](q_last, k, kvh, pos, lse, vert, s, sc, *common, vert.stride(0),
                                              L=l_len, L_PAD=l_pad, BLOCK_N=64, HEAD_DIM=d)
    _slash_kernel[(h, triton.cdiv(s, 64))](q_last, k, kvh, pos, lse, slash, s, sc, *common, slash.stride(0),
                                           L=l_len, BLOCK_N=64, HEAD_DIM=d)
    return vert, slash


@triton.jit
def _decode_scores_kernel(Q, K, KvHeads, BlockTable, SeqLens, Out, qk_scale, max_len,
                          stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_bt,
                          stride_ob, stride_oh,
                          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr):
    # program = (request, query head, key tile); one query row: a vector-matrix product
    b = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    g = tl.load(KvHeads + h)
    length = tl.load(SeqLens + b)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d).to(tl.float32)
    pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = pos < length
    page = tl.load(BlockTable + b * stride_bt + pos // PAGE, mask=valid, other=0).to(tl.int64)
    k = tl.load(K + page[:, None] * stride_kb + g * stride_kh + (pos % PAGE).to(tl.int64)[:, None] * stride_kt
                + offs_d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    s = tl.where(valid, tl.sum(k * q[None, :], 1) * qk_scale, float("-inf"))
    tl.store(Out + b * stride_ob + h * stride_oh + pos, s, mask=pos < max_len)


def decode_scores(q, k_cache, block_table, seq_lens, kv_heads, scale=None, max_len: int | None = None):
    """Same contract as ``estimate.decode_scores`` (``[B, H, max(seq_lens)]`` fp32, -inf past the end);
    ``max_len`` avoids a device sync when the caller knows it."""
    b, h, d = q.shape
    max_len = int(seq_lens.max().item()) if max_len is None else max_len
    out = torch.empty(b, h, max_len, dtype=torch.float32, device=q.device)
    sc = (1.0 / math.sqrt(d) if scale is None else scale)
    table = block_table.to(q.device, torch.int32)
    if b and max_len:
        _decode_scores_kernel[(b, h, triton.cdiv(max_len, 64))](
            q, k_cache, kv_heads.to(q.device, torch.int32).contiguous(), table, seq_lens.to(q.device, torch.int32),
            out, sc, max_len,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), table.stride(0),
            out.stride(0), out.stride(1), BLOCK_N=64, HEAD_DIM=d, PAGE=k_cache.shape[2])
    return out


@triton.jit
def _page_min_max_kernel(K, BlockTable, SeqLens, Kmin, Kmax,
                         stride_kb, stride_kh, stride_kt, stride_bt, stride_mb, stride_mp, stride_mh,
                         PAGE_SIZE: tl.constexpr, P_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE_PAGE: tl.constexpr):
    b = tl.program_id(0)
    p = tl.program_id(1)
    g = tl.program_id(2)
    length = tl.load(SeqLens + b)
    pos = p * PAGE_SIZE + tl.arange(0, P_PAD)
    valid = (tl.arange(0, P_PAD) < PAGE_SIZE) & (pos < length)
    offs_d = tl.arange(0, HEAD_DIM)
    blk = tl.load(BlockTable + b * stride_bt + pos // CACHE_PAGE, mask=valid, other=0).to(tl.int64)
    k = tl.load(K + blk[:, None] * stride_kb + g * stride_kh + (pos % CACHE_PAGE).to(tl.int64)[:, None] * stride_kt
                + offs_d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    kmin = tl.min(tl.where(valid[:, None], k, float("inf")), 0)
    kmax = tl.max(tl.where(valid[:, None], k, float("-inf")), 0)
    base = b * stride_mb + p * stride_mp + g * stride_mh + offs_d
    tl.store(Kmin + base, kmin)
    tl.store(Kmax + base, kmax)


def page_min_max(k_cache, block_table, seq_lens, page_size: int, max_len: int | None = None):
    """Same contract as ``estimate.page_min_max``: ``(kmin, kmax)`` ``[B, P, Hkv, D]`` fp32."""
    b = seq_lens.shape[0]
    hkv, d = k_cache.shape[1], k_cache.shape[3]
    max_len = int(seq_lens.max().item()) if max_len is None else max_len
    n_pages = -(-max_len // page_size)
    dev = k_cache.device
    kmin = torch.empty(b, n_pages, hkv, d, dtype=torch.float32, device=dev)
    kmax = torch.empty_like(kmin)
    table = block_table.to(dev, torch.int32)
    if b and n_pages:
        _page_min_max_kernel[(b, n_pages, hkv)](
            k_cache, table, seq_lens.to(dev, torch.int32), kmin, kmax,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), table.stride(0),
            kmin.stride(0), kmin.stride(1), kmin.stride(2),
            PAGE_SIZE=page_size, P_PAD=triton.next_power_of_2(page_size), HEAD_DIM=d, CACHE_PAGE=k_cache.shape[2])
    return kmin, kmax
