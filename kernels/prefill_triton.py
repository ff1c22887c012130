"""Sparse prefill as a Triton kernel: flash attention over the keys a ``SparseIndex`` names.

One program per (query block of the packed batch, query head). It walks the block's key ranges
tile by tile (aligned blocks, unaligned slash windows, sinks and strides are all ranges), then its
gathered key columns, with the flash-attention online softmax in fp32. Causality is applied on
top by position. K/V are read from contiguous packed tensors or straight from the paged cache
through the block table (a per-key page lookup, so ranges may cross pages freely). GQA: a program
reads the KV head of its query head; nothing is repeated.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .index import SparseIndex
from .varlen import VarlenIndex

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))


def interpreted(kernel) -> bool:
    """Whether ``kernel`` was decorated under TRITON_INTERPRET=1 (numpy interpreter)."""
    return type(kernel).__name__ == "InterpretedFunction"


@triton.jit
def _load_kv_tile(K, V, kpos, valid, kvh, req, kv_start, BlockTable, stride_bt,
                  stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                  offs_d, PAGED: tl.constexpr, PAGE: tl.constexpr):
    # kpos: [BLOCK_N] absolute positions of the request; returns K, V tiles [BLOCK_N, HEAD_DIM]
    if PAGED:
        page = tl.load(BlockTable + req * stride_bt + kpos // PAGE, mask=valid, other=0).to(tl.int64)
        slot = (kpos % PAGE).to(tl.int64)
        k_row = page * stride_kb + slot * stride_kt
        v_row = page * stride_vb + slot * stride_vt
    else:
        row = (kv_start + kpos).to(tl.int64)
        k_row = row * stride_kt
        v_row = row * stride_vt
    k = tl.load(K + k_row[:, None] + kvh * stride_kh + offs_d[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(V + v_row[:, None] + kvh * stride_vh + offs_d[None, :], mask=valid[:, None], other=0.0)
    return k, v


@triton.jit
def _online_softmax_step(q, k, v, kpos, valid, q_pos, m_i, l_i, acc, qk_scale,
                         DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # scores in log2 units; a key is allowed when listed (valid) and not after the query
    if UPCAST:  # the interpreter multiplies bf16 bit patterns as integers: give it fp32 values
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    qk = qk * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    allowed = valid[None, :] & (kpos[None, :] <= q_pos[:, None])
    qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # m_i starts finite, so no inf - inf below
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)  # P in the input dtype for the second matmul, as flash attention does
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _sparse_prefill_kernel(
    Q, K, V, Out, Lse,
    RS, RE, RC, CS, CC,
    BlockReq, BlockQStart, BlockQLen, BlockPos0, KvStart, BlockTable,
    qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_rh, stride_rb, stride_ch, stride_cb, stride_nh, stride_bt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    gb = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    req = tl.load(BlockReq + gb)
    q0 = tl.load(BlockQStart + gb)
    nq = tl.load(BlockQLen + gb)
    pos0 = tl.load(BlockPos0 + gb)
    kv_start = tl.load(KvStart + req)
    horizon = pos0 + nq  # one past the last query's position: no key at or after it is visible

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (q0 + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=(offs_m < nq)[:, None], other=0.0)
    q_pos = pos0 + offs_m

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # key ranges [start, end), cut at the causal horizon
    n_ranges = tl.load(RC + h * stride_nh + gb)
    for r in range(0, n_ranges):
        r_start = tl.load(RS + h * stride_rh + gb * stride_rb + r)
        r_end = tl.minimum(tl.load(RE + h * stride_rh + gb * stride_rb + r), horizon)
        for t in range(r_start, r_end, BLOCK_N):
            kpos = t + offs_n
            valid = kpos < r_end
            k, v = _load_kv_tile(K, V, kpos, valid, kvh, req, kv_start, BlockTable, stride_bt,
                                 stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                 offs_d, PAGED, PAGE)
            m_i, l_i, acc = _online_softmax_step(q, k, v, kpos, valid, q_pos, m_i, l_i, acc, qk_scale,
                                                 DOT_PRECISION, UPCAST)

    # single key columns (vertical lines), BLOCK_N at a time
    n_cols = tl.load(CC + h * stride_nh + gb)
    for c in range(0, n_cols, BLOCK_N):
        in_list = (c + offs_n) < n_cols
        kpos = tl.load(CS + h * stride_ch + gb * stride_cb + c + offs_n, mask=in_list, other=0)
        valid = in_list & (kpos < horizon)
        k, v = _load_kv_tile(K, V, kpos, valid, kvh, req, kv_start, BlockTable, stride_bt,
                             stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                             offs_d, PAGED, PAGE)
        m_i, l_i, acc = _online_softmax_step(q, k, v, kpos, valid, q_pos, m_i, l_i, acc, qk_scale,
                                             DOT_PRECISION, UPCAST)

    has_key = l_i > 0.0  # a query that kept no key returns 0 and lse -inf
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    row_ok = offs_m < nq
    tl.store(Out + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    if WRITE_LSE:
        lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))  # back to natural log
        tl.store(Lse + h * stride_lh + q_rows, lse, mask=row_ok)


def _launch(q, k, v, index: VarlenIndex, kv_starts: torch.Tensor, block_table: torch.Tensor | None,
            scale: float | None, return_lse: bool, out: torch.Tensor | None = None):
    # q: [T, Hq, D]; k, v: [S_total, Hkv, D] (contiguous packing) or [num_blocks, Hkv, page, D] (paged);
    # out: [T, Hq, D], only the layout's rows are written (default: a new tensor like q)
    paged = block_table is not None
    t_total, hq, d = q.shape
    hkv = k.shape[1]  # [S, Hkv, D] and [num_blocks, Hkv, page, D] alike
    if d not in (64, 128) or k.shape[-1] != d:
        raise ValueError(f"sparse prefill (Triton): head dim must be 64 or 128 for q and k, got {d} and {k.shape[-1]}")
    if hq % hkv:
        raise ValueError(f"sparse prefill (Triton): {hq} query heads is not a multiple of {hkv} KV heads")
    if index.num_heads != hq or index.layout.rows_needed > t_total:
        raise ValueError(
            f"sparse prefill (Triton): index has {index.num_heads} heads and reaches row {index.layout.rows_needed}, "
            f"q has {hq} heads and {t_total} rows")
    if q.stride(2) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError("sparse prefill (Triton): q, k, v need a unit-stride last dim and one dtype")
    if out is not None and (out.shape != q.shape or out.stride(2) != 1 or out.dtype != q.dtype):
        raise ValueError(f"sparse prefill (Triton): out {tuple(out.shape)} {out.dtype} must match q "
                         f"{tuple(q.shape)} {q.dtype} with a unit-stride last dim")
    if index.block_m not in (16, 32, 64, 128):
        raise ValueError(f"sparse prefill (Triton): block_m {index.block_m} must be 16, 32, 64 or 128")
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(hq, max(t_total, 1), dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    fp32 = q.dtype == torch.float32
    block_n = 32 if fp32 else 64  # fp32 tiles are twice the registers
    if paged:
        kb, kt, kh = k.stride(0), k.stride(2), k.stride(1)
        vb, vt, vh = v.stride(0), v.stride(2), v.stride(1)
        table, page, bt_stride = block_table.to(torch.int32), k.shape[2], block_table.stride(0)
    else:
        kb, kt, kh = 0, k.stride(0), k.stride(1)
        vb, vt, vh = 0, v.stride(0), v.stride(1)
        table, page, bt_stride = kv_starts, 1, 0  # unused
    grid = (index.num_blocks, hq)
    if index.num_blocks:
        _sparse_prefill_kernel[grid](
            q, k, v, out, lse,
            index.range_start, index.range_end, index.range_count, index.columns, index.column_count,
            index.block_req, index.block_q_start, index.block_q_len, index.block_pos0, kv_starts, table,
            scale * _LOG2E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), lse.stride(0),
            kb, kt, kh, vb, vt, vh,
            index.range_start.stride(0), index.range_start.stride(1),
            index.columns.stride(0), index.columns.stride(1), index.range_count.stride(0), bt_stride,
            GROUP=hq // hkv, BLOCK_M=index.block_m, BLOCK_N=block_n, HEAD_DIM=d,
            PAGED=paged, PAGE=page, WRITE_LSE=return_lse, DOT_PRECISION="ieee" if fp32 else "tf32",
            UPCAST=interpreted(_sparse_prefill_kernel),
        )
    lse = lse[:, :t_total]
    return (out, lse) if return_lse else out


def sparse_prefill_varlen_triton(q, k, v, kv_starts, index: VarlenIndex, scale=None, return_lse=False, out=None):
    """Chunks of q ``[T, Hq, D]`` (``index.layout``), k/v ``[S_total, Hkv, D]``, ``kv_starts [B]`` int32."""
    starts = torch.as_tensor(kv_starts, dtype=torch.int32, device=q.device)
    return _launch(q, k, v, index.to_device(q.device), starts, None, scale, return_lse, out)


def sparse_prefill_varlen_paged_triton(q, k_cache, v_cache, block_table, index: VarlenIndex, scale=None,
                                       return_lse=False, out=None):
    """Chunks of q with K/V from the paged cache ``[num_blocks, Hkv, page, D]`` via ``block_table [B, *]``."""
    starts = block_table.new_zeros(1, dtype=torch.int32)  # unused when paged
    return _launch(q, k_cache, v_cache, index.to_device(q.device), starts, block_table, scale, return_lse, out)


def sparse_prefill_triton(q, k, v, index: SparseIndex, scale=None, return_lse=False, out=None):
    """One request, contiguous K/V: same contract as ``sparse_prefill_torch``."""
    if k.shape[0] != index.seq_len:
        raise ValueError(f"sparse_prefill: k has {k.shape[0]} positions, expected seq_len {index.seq_len}")
    return sparse_prefill_varlen_triton(q, k, v, [0], VarlenIndex.pack([index], q.device), scale, return_lse, out)


def sparse_prefill_paged_triton(q, k_cache, v_cache, block_table_row, index: SparseIndex, scale=None,
                                return_lse=False):
    """One request from the paged cache: same contract as ``sparse_prefill_paged_torch``."""
    return sparse_prefill_varlen_paged_triton(q, k_cache, v_cache, block_table_row.view(1, -1),
                                              VarlenIndex.pack([index], q.device), scale, return_lse)
