"""Paged sparse decode as Triton kernels: split-K over the selected tokens, then a merge.

Grid ``(B, selection heads, splits)``. A program reads its (request, head) selection from device
memory (mode, sink/window, positions or blocks, lengths), takes its share of the selected slots,
turns each slot into a token position, reads K/V through the block table and keeps an online
softmax. When the selection is shared by a GQA group, one program carries the whole group's
queries, so every selected K/V row is loaded once per group. A second kernel merges the splits
by their log-sum-exp. Nothing depends on host values: the grid is fixed by shapes, so the launch
can be captured in a CUDA graph (pass ``num_splits`` to keep it fixed across batches).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .decode import _check_decode_inputs
from .index import DecodeSelection
from .prefill_triton import _LOG2E, interpreted


@triton.jit
def _sparse_decode_split_kernel(
    Q, K, V, PartOut, PartLse, BlockTable, SeqLens,
    Mode, Sink, Window, Indices, Count,
    qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_bt, stride_sb, stride_ib, stride_ih, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    ROWS: tl.constexpr, ROWS_PAD: tl.constexpr, HS_PER_KV: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, SEL_BS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    hs = tl.program_id(1)
    split = tl.program_id(2)
    kvh = hs // HS_PER_KV
    length = tl.load(SeqLens + b)
    mode = tl.load(Mode + b * stride_sb + hs)
    count = tl.load(Count + b * stride_sb + hs)
    sink = tl.minimum(tl.maximum(tl.load(Sink + b * stride_sb + hs), 0), length)
    w_start = tl.maximum(length - tl.load(Window + b * stride_sb + hs), sink)
    # number of selected slots: DENSE 0, WINDOW 1, POSITIONS 2, BLOCKS 3 (DecodeMode)
    n_sel = tl.where(mode == 0, length,
                     tl.where(mode == 1, sink + length - w_start,
                              tl.where(mode == 2, count, count * SEL_BS)))
    per_split = tl.cdiv(tl.cdiv(n_sel, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_sel)

    offs_r = tl.arange(0, ROWS_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = hs * ROWS + offs_r  # the query heads this selection row serves
    row_ok = offs_r < ROWS
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([ROWS_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS_PAD], dtype=tl.float32)
    acc = tl.zeros([ROWS_PAD, HEAD_DIM], dtype=tl.float32)
    sel = Indices + b * stride_ib + hs * stride_ih
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + offs_n
        in_sel = j < hi
        win_pos = tl.where(j < sink, j, w_start + (j - sink))
        mode_v = tl.zeros([BLOCK_N], dtype=tl.int32) + mode  # a vector, so masks combine elementwise
        listed = tl.load(sel + j, mask=in_sel & (mode_v == 2), other=0)
        block = tl.load(sel + j // SEL_BS, mask=in_sel & (mode_v == 3), other=0)
        pos = tl.where(mode == 0, j, tl.where(mode == 1, win_pos, tl.where(mode == 2, listed, block * SEL_BS + j % SEL_BS)))
        valid = in_sel & (pos >= 0) & (pos < length)
        page = tl.load(BlockTable + b * stride_bt + pos // PAGE, mask=valid, other=0).to(tl.int64)
        slot = (pos % PAGE).to(tl.int64)
        k = tl.load(K + page[:, None] * stride_kb + kvh * stride_kh + slot[:, None] * stride_kt + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        v = tl.load(V + page[:, None] * stride_vb + kvh * stride_vh + slot[:, None] * stride_vt + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 bit patterns as integers: give it fp32 values
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION)
        else:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))  # [ROWS_PAD, BLOCK_N], log2 units
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))  # log2 units
    tl.store(PartOut + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :], out,
             mask=row_ok[:, None])
    tl.store(PartLse + b * stride_lb + heads * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    PartOut, PartLse, Out, Lse,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_sb,
    SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < SPLITS
    lse = tl.load(PartLse + b * stride_lb + h * stride_lh + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    has_key = m > float("-inf")
    m_safe = tl.where(has_key, m, 0.0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m_safe), 0.0)  # each split's softmax mass
    part = tl.load(PartOut + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                   mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(has_key, total, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))
    if WRITE_LSE:
        lse_nat = tl.where(has_key, (m_safe + tl.log2(tl.where(has_key, total, 1.0))) * 0.6931471805599453,
                           float("-inf"))
        tl.store(Lse + b * stride_sb + h, lse_nat)


def default_num_splits(block_table: torch.Tensor, page: int) -> int:
    """Splits from the largest context the block table can describe (a shape, not a value, so a
    captured graph keeps its grid): about one split per 2K tokens, at most 32."""
    capacity = block_table.shape[1] * page
    return max(1, min(32, -(-capacity // 2048)))


def sparse_decode_triton(q, k_cache, v_cache, block_table, seq_lens, selection: DecodeSelection,
                         scale: float | None = None, return_lse: bool = False, num_splits: int | None = None):
    """Same contract as ``sparse_decode_torch``; ``num_splits`` fixes the split-K grid."""
    _check_decode_inputs(q, k_cache, v_cache, block_table, seq_lens, selection)
    b, hq, d = q.shape
    hkv, page = k_cache.shape[1], k_cache.shape[2]
    if d not in (64, 128):
        raise ValueError(f"sparse_decode (Triton): head dim must be 64 or 128, got {d}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("sparse_decode (Triton): q and the caches need a unit-stride last dim")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"sparse_decode (Triton): q is {q.dtype} but the caches are {k_cache.dtype}/{v_cache.dtype}")
    hs = selection.num_heads
    rows = hq // hs
    splits = num_splits or default_num_splits(block_table, page)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dev = q.device
    sel = selection.to(dev)
    mode, sink, window, count = (x.contiguous() for x in (sel.mode, sel.sink, sel.window, sel.count))
    indices = sel.indices.contiguous()
    table = block_table.to(dev, torch.int32)
    lens = seq_lens.to(dev, torch.int32)
    part_out = torch.empty(b, hq, splits, d, dtype=torch.float32, device=dev)
    part_lse = torch.empty(b, hq, splits, dtype=torch.float32, device=dev)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, dtype=torch.float32, device=dev)
    fp32 = q.dtype == torch.float32
    if b:
        _sparse_decode_split_kernel[(b, hs, splits)](
            q, k_cache, v_cache, part_out, part_lse, table, lens,
            mode, sink, window, indices, count,
            scale * _LOG2E,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            table.stride(0), mode.stride(0), indices.stride(0), indices.stride(1),
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            ROWS=rows, ROWS_PAD=max(16, triton.next_power_of_2(rows)), HS_PER_KV=hs // hkv,
            SPLITS=splits, BLOCK_N=32 if fp32 else 64, HEAD_DIM=d, PAGE=page,
            SEL_BS=sel.block_size, UPCAST=interpreted(_sparse_decode_split_kernel),
            DOT_PRECISION="ieee" if fp32 else "tf32",
        )
        _merge_splits_kernel[(b, hq)](
            part_out, part_lse, out, lse,
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=d, WRITE_LSE=return_lse,
        )
    return (out, lse) if return_lse else out
