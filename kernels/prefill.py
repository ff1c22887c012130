"""Sparse prefill attention over a ``SparseIndex``: the torch path (CPU, and the test oracle).

Work is organised in *rows*: one row is one (query head, query block). A row's keys are read in
two parts: (A) everything its ranges and columns name below the block's first query, which every
query of the block may see (ranges as whole 64-key tiles, columns one by one, one key mask per
row), and (B) the block's own span of positions, under the causal mask. The parts are merged by
their log-sum-exp. Rows are sorted by work and batched so that padding stays small and no S x S
matrix ever exists. Heads whose index covers every causal key take torch's fused CPU flash kernel
(the dense fast path). GQA: a row reads its KV head only; K/V are never repeated per query head.

The Triton kernels (``prefill_triton.py``) implement the same contract; ``sparse_prefill`` and
``sparse_prefill_paged`` (in ``dispatch.py``) choose between them.
"""

from __future__ import annotations

import math

import torch

from .attention_torch import KEY_SLOT_BUDGET, attend, chunks, dense_attention_lse, dense_fast_path_available
from .attention_torch import in_sorted_ranges, merge_partials
from .index import SparseIndex

KEY_TILE = 64  # keys per gathered tile: ranges are read as whole contiguous tiles, not key by key


def block_horizon(index: SparseIndex) -> torch.Tensor:
    """``[NQB]`` long: one past the last key position any query of the block may read."""
    qb = torch.arange(index.num_q_blocks, device=index.device)
    return index.q_offset + torch.clamp((qb + 1) * index.block_m, max=index.q_len)


def keys_per_block(index: SparseIndex) -> torch.Tensor:
    """``[H, NQB]`` long: keys each (head, block) lists below its causal horizon."""
    horizon = block_horizon(index).view(1, -1, 1)
    r_valid = torch.arange(index.range_start.shape[2], device=index.device) < index.range_count[..., None]
    r_len = (torch.minimum(index.range_end.long(), horizon) - index.range_start.long()).clamp(min=0)
    c_valid = torch.arange(index.columns.shape[2], device=index.device) < index.column_count[..., None]
    return (r_len * r_valid).sum(-1) + (c_valid & (index.columns.long() < horizon)).sum(-1)


def dense_heads(index: SparseIndex) -> torch.Tensor:
    """``[H]`` bool: heads whose every block keeps all causal keys (ranges are disjoint and
    columns lie outside them, so a full count means full coverage)."""
    return (keys_per_block(index) == block_horizon(index)[None, :]).all(dim=1)


def expand_segments(seg_start: torch.Tensor, seg_len: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded lists of the integers covered by segments ``[start, start + len)`` per row.

    seg_start, seg_len: ``[n, G]`` long. Returns values ``[n, length]`` (0 in padding) and valid
    ``[n, length]``. Slot j of a row falls in the segment whose running end first exceeds j.
    """
    ends = torch.cumsum(seg_len, dim=1)  # [n, G]
    slots = torch.arange(length, device=seg_len.device).expand(seg_len.shape[0], length).contiguous()
    seg = torch.searchsorted(ends, slots, right=True).clamp(max=seg_len.shape[1] - 1)  # [n, L]
    val = torch.gather(seg_start, 1, seg) + (slots - torch.gather(ends - seg_len, 1, seg))
    valid = slots < ends[:, -1:]
    return torch.where(valid, val, 0), valid


def _prefix_tiles(index: SparseIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key tiles each (head, block) reads *below its first query* (the part without causality).

    Returns tile_start, tile_count ``[H, NQB, R]`` long (a range's tiles, minus a first tile the
    previous range already brought) and prefix_cols ``[H, NQB]``: how many leading columns lie
    below the first query (columns are sorted, so they are a prefix of the list).
    """
    dev = index.device
    q_start = (index.q_offset + torch.arange(index.num_q_blocks, device=dev) * index.block_m).view(1, -1, 1)
    r_valid = torch.arange(index.range_start.shape[2], device=dev) < index.range_count[..., None]
    rs = index.range_start.long()
    re = torch.minimum(index.range_end.long(), q_start)
    live = r_valid & (re > rs)  # sorted ranges: the live ones form a prefix
    t0 = rs // KEY_TILE
    t1 = torch.where(live, -(-re // KEY_TILE), 0)
    prev_end = torch.nn.functional.pad(torch.cummax(t1, dim=2).values[..., :-1], (1, 0))
    t0 = torch.maximum(t0, prev_end)
    count = torch.where(live, (t1 - t0).clamp(min=0), 0)
    c_valid = torch.arange(index.columns.shape[2], device=dev) < index.column_count[..., None]
    prefix_cols = (c_valid & (index.columns.long() < q_start)).sum(-1)
    return t0, count, prefix_cols


def _prefill_core(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, index: SparseIndex, scale: float):
    """q: ``[Tq, Hq, D]``; kh, vh: ``[Hkv, S_pad, D]`` contiguous, zero-padded to whole tiles plus
    one query block. Returns out ``[Hq, Tq, D]`` fp32 and lse ``[Hq, Tq]`` fp32."""
    tq, hq, d = q.shape
    hkv, s_pad, _ = kh.shape
    group, bm, nqb = hq // hkv, index.block_m, index.num_q_blocks
    dev = q.device
    index = index.to(dev)
    out = torch.zeros(hq, nqb * bm, d, dtype=torch.float32, device=dev)
    lse = torch.full((hq, nqb * bm), float("-inf"), dtype=torch.float32, device=dev)

    is_dense = dense_heads(index) if dense_fast_path_available(q) else torch.zeros(hq, dtype=torch.bool, device=dev)
    for g in range(hkv):  # dense heads: one fused call per KV head for its dense query heads
        heads = [h for h in range(g * group, (g + 1) * group) if bool(is_dense[h])]
        if heads:
            o, l = dense_attention_lse(q[:, heads].transpose(0, 1), kh[g, : index.seq_len], vh[g, : index.seq_len],
                                       index.q_offset, scale)
            out[heads, :tq], lse[heads, :tq] = o, l

    # Sparse heads, row = (head, block): part A = tiles/columns below the block's first query
    # (no causal mask needed, one key mask per row), part B = the block's own 64 positions
    # (causal), merged by LSE. Rows are sorted by work so padding stays small.
    flat = lambda t: t.reshape(hq * nqb, *t.shape[2:])  # noqa: E731
    t0, tcount, ncols = (flat(x) for x in _prefix_tiles(index))
    rs, re, rc = flat(index.range_start.long()), flat(index.range_end.long()), flat(index.range_count.long())
    cs, cc = flat(index.columns.long()), flat(index.column_count.long())
    sparse_row = ~is_dense.repeat_interleave(nqb)
    work = torch.where(sparse_row, tcount.sum(-1) * KEY_TILE + ncols + bm, 0)
    order = torch.argsort(work, stable=True)
    q_rows = torch.nn.functional.pad(q.transpose(0, 1), (0, 0, 0, nqb * bm - tq)).reshape(hq * nqb, bm, d)
    k_tiles, v_tiles = kh.view(-1, KEY_TILE, d), vh.view(-1, KEY_TILE, d)  # [Hkv * S_pad / 64, 64, D]
    k_flat, v_flat = kh.view(-1, d), vh.view(-1, d)  # [Hkv * S_pad, D]
    # [Hkv, S_pad - bm + 1, bm, D]: every window of bm consecutive keys, as a view
    k_win = kh.as_strided((hkv, s_pad - bm + 1, bm, d), (s_pad * d, d, d, 1))
    v_win = vh.as_strided((hkv, s_pad - bm + 1, bm, d), (s_pad * d, d, d, 1))
    out_rows, lse_rows = out.view(hq * nqb, bm, d), lse.view(hq * nqb, bm)
    local = torch.arange(bm, device=dev)
    for i, j, _ in chunks(work[order].tolist(), KEY_SLOT_BUDGET):
        rows = order[i:j]
        kvh = rows // nqb // group
        q_start = index.q_offset + (rows % nqb) * bm  # [n]
        # part B: the block's own span, causal
        pos_b = q_start[:, None] + local  # [n, bm]
        member = in_sorted_ranges(pos_b, rs[rows], re[rows], rc[rows])
        member |= in_sorted_ranges(pos_b, cs[rows], cs[rows] + 1, cc[rows])
        allowed = (member & (pos_b < index.seq_len))[:, None, :] & (local[None, :, None] >= local[None, None, :])
        o, l = attend(q_rows[rows], k_win[kvh, q_start], v_win[kvh, q_start], allowed, scale)
        # part A: whole tiles of the ranges + single columns, all visible to every query
        n_tiles, n_cols = int(tcount[rows].sum(-1).max()), int(ncols[rows].max())
        if n_tiles + n_cols:
            tiles, t_ok = expand_segments(t0[rows], tcount[rows], n_tiles)  # [n, Tt]
            pos_t = (tiles[:, :, None] * KEY_TILE + torch.arange(KEY_TILE, device=dev)).view(len(rows), -1)
            ok_t = t_ok.repeat_interleave(KEY_TILE, dim=1) & (pos_t < q_start[:, None])
            ok_t &= in_sorted_ranges(pos_t, rs[rows], re[rows], rc[rows])
            cols = cs[rows, :n_cols]
            ok_c = torch.arange(n_cols, device=dev) < ncols[rows, None]
            tile_id = (kvh[:, None] * (s_pad // KEY_TILE) + tiles).view(-1)
            col_id = (kvh[:, None] * s_pad + torch.where(ok_c, cols, 0)).view(-1)
            ka = torch.cat([k_tiles.index_select(0, tile_id).view(len(rows), -1, d),
                            k_flat.index_select(0, col_id).view(len(rows), -1, d)], dim=1)
            va = torch.cat([v_tiles.index_select(0, tile_id).view(len(rows), -1, d),
                            v_flat.index_select(0, col_id).view(len(rows), -1, d)], dim=1)
            oa, la = attend(q_rows[rows], ka, va, torch.cat([ok_t, ok_c], dim=1)[:, None, :], scale)
            o, l = merge_partials(oa, la, o, l)
        out_rows[rows], lse_rows[rows] = o, l
    return out[:, :tq], lse[:, :tq]


def _head_major(x: torch.Tensor, seq_len: int, block_m: int) -> torch.Tensor:
    """``[S, Hkv, D]`` -> contiguous ``[Hkv, S_pad, D]``, zero-padded to whole key tiles plus one
    query block (so every tile and every block-long window is in bounds)."""
    s_pad = -(-seq_len // KEY_TILE) * KEY_TILE + -(-block_m // KEY_TILE) * KEY_TILE
    out = x.new_zeros(x.shape[1], s_pad, x.shape[2])
    out[:, :seq_len] = x.transpose(0, 1)
    return out


def _check_inputs(q: torch.Tensor, index: SparseIndex, hkv: int, d: int, where: str) -> None:
    tq, hq, dq = q.shape
    if dq != d:
        raise ValueError(f"{where}: q has head dim {dq} but the keys have {d}")
    if hq % hkv:
        raise ValueError(f"{where}: {hq} query heads is not a multiple of {hkv} KV heads")
    if index.num_heads != hq:
        raise ValueError(f"{where}: index has {index.num_heads} heads, expected one per query head ({hq})")
    if index.q_len != tq:
        raise ValueError(f"{where}: index.q_len is {index.q_len} but q has {tq} queries")


def sparse_prefill_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Attention of one request's query chunk over the keys ``index`` selects (causal on top).

    q: ``[Tq, Hq, D]``; k, v: ``[S, Hkv, D]`` with ``S = index.seq_len`` (strided views fine);
    index: one entry per query head. Returns ``out [Tq, Hq, D]`` in q's dtype and, with
    ``return_lse``, ``lse [Hq, Tq]`` fp32 (natural log; -inf for a query that keeps no key,
    whose output is 0).
    """
    _check_inputs(q, index, k.shape[1], k.shape[2], "sparse_prefill")
    if k.shape[0] != index.seq_len or v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"sparse_prefill: k/v have shapes {tuple(k.shape)}/{tuple(v.shape)}, expected "
            f"[{index.seq_len} (= q_offset {index.q_offset} + q_len {index.q_len}), Hkv, D]"
        )
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    kh = _head_major(k.to(q.dtype), index.seq_len, index.block_m)
    vh = _head_major(v.to(q.dtype), index.seq_len, index.block_m)
    out, lse = _prefill_core(q, kh, vh, index, scale)
    out = out.transpose(0, 1).to(q.dtype)
    return (out, lse) if return_lse else out


def sparse_prefill_paged_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table_row: torch.Tensor,
    index: SparseIndex,
    scale: float | None = None,
    return_lse: bool = False,
):
    """``sparse_prefill_torch`` reading K/V of one request from the paged cache.

    k_cache, v_cache: ``[num_blocks, Hkv, block_size, D]`` (strided views of vLLM's cache are
    fine); block_table_row: ``[max_blocks]`` int, the request's logical -> physical blocks, which
    must cover ``index.seq_len`` positions. On CPU the request's positions are first gathered into
    one contiguous head-major copy (``S x Hkv x D``, small next to the attention work).
    """
    _check_inputs(q, index, k_cache.shape[1], k_cache.shape[3], "sparse_prefill_paged")
    bs = k_cache.shape[2]
    if block_table_row.shape[0] * bs < index.seq_len:
        raise ValueError(
            f"sparse_prefill_paged: block table row covers {block_table_row.shape[0]} blocks x {bs} "
            f"tokens, fewer than seq_len {index.seq_len}"
        )
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale

    # one gather of the request's positions into head-major order; every later read is a tile
    pos = torch.arange(index.seq_len, device=k_cache.device)
    blocks = block_table_row.to(k_cache.device).long()[pos // bs]
    kh = _head_major(k_cache[blocks, :, pos % bs].to(q.dtype), index.seq_len, index.block_m)
    vh = _head_major(v_cache[blocks, :, pos % bs].to(q.dtype), index.seq_len, index.block_m)
    out, lse = _prefill_core(q, kh, vh, index, scale)
    out = out.transpose(0, 1).to(q.dtype)
    return (out, lse) if return_lse else out
