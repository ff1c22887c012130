"""Sparse prefill attention over a ``SparseIndex``: the torch path (CPU, and the test oracle).

Work is organised in *rows*: one row is one (query head, 64-query block) with the list of key
positions its ranges and columns name, clipped to the block's causal horizon. Rows are sorted by
key count and attended in chunks padded to the chunk's longest row, so padding stays small and no
S x S matrix ever exists. Heads whose index covers every causal key go through torch's fused CPU
flash kernel instead (the dense fast path). GQA: a row gathers its keys from its KV head only.

The Triton kernels (``prefill_triton.py``) implement the same contract; ``sparse_prefill`` and
``sparse_prefill_paged`` (in ``dispatch.py``) choose between them.
"""

from __future__ import annotations

import math

import torch

from .attention_torch import (
    KEY_SLOT_BUDGET,
    Gather,
    attend_rows,
    contiguous_gather,
    dense_attention_lse,
    dense_fast_path_available,
    paged_gather,
)
from .index import SparseIndex
from .reference import paged_to_contiguous


def block_horizon(index: SparseIndex) -> torch.Tensor:
    """``[NQB]`` long: one past the last key position any query of the block may read."""
    qb = torch.arange(index.num_q_blocks, device=index.device)
    return index.q_offset + torch.clamp((qb + 1) * index.block_m, max=index.q_len)


def row_segments(index: SparseIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each (head, block)'s keys as segments: ranges, then columns as one-key segments.

    Returns seg_start, seg_len ``[H, NQB, R + C]`` long (clipped to the causal horizon, 0-length
    where unused) and n_keys ``[H, NQB]`` long.
    """
    horizon = block_horizon(index).view(1, -1, 1)  # [1, NQB, 1]
    dev = index.device
    r_valid = torch.arange(index.range_start.shape[2], device=dev) < index.range_count[..., None]
    rs = index.range_start.long()
    re = torch.minimum(index.range_end.long(), horizon)
    r_len = torch.where(r_valid, (re - rs).clamp(min=0), 0)
    c_valid = torch.arange(index.columns.shape[2], device=dev) < index.column_count[..., None]
    cols = index.columns.long()
    c_len = (c_valid & (cols < horizon)).long()
    seg_start = torch.cat([rs, cols], dim=2)
    seg_len = torch.cat([r_len, c_len], dim=2)
    return seg_start, seg_len, seg_len.sum(-1)


def expand_segments(seg_start: torch.Tensor, seg_len: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded key positions of rows given as segments.

    seg_start, seg_len: ``[n, G]``. Returns pos ``[n, length]`` long (0 in padding) and valid
    ``[n, length]`` bool. Slot j of a row falls in the segment whose running end first exceeds j.
    """
    ends = torch.cumsum(seg_len, dim=1)  # [n, G]
    slots = torch.arange(length, device=seg_len.device).expand(seg_len.shape[0], length).contiguous()
    seg = torch.searchsorted(ends, slots, right=True).clamp(max=seg_len.shape[1] - 1)  # [n, L]
    seg_begin = torch.gather(ends - seg_len, 1, seg)
    pos = torch.gather(seg_start, 1, seg) + (slots - seg_begin)
    valid = slots < ends[:, -1:]
    return torch.where(valid, pos, 0), valid


def dense_heads(index: SparseIndex, n_keys: torch.Tensor) -> torch.Tensor:
    """``[H]`` bool: heads whose every block keeps all causal keys (ranges are disjoint and
    columns lie outside them, so a full count means full coverage)."""
    return (n_keys == block_horizon(index)[None, :]).all(dim=1)


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


def _prefill_core(
    q: torch.Tensor,
    gather: Gather,
    dense_kv: "callable",
    index: SparseIndex,
    hkv: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [Tq, Hq, D]. Returns out [Hq, Tq, D] fp32 and lse [Hq, Tq] fp32.
    tq, hq, d = q.shape
    group = hq // hkv
    bm, nqb = index.block_m, index.num_q_blocks
    dev = q.device
    out = torch.zeros(hq, nqb * bm, d, dtype=torch.float32, device=dev)
    lse = torch.full((hq, nqb * bm), float("-inf"), dtype=torch.float32, device=dev)
    seg_start, seg_len, n_keys = row_segments(index.to(dev))
    is_dense = dense_heads(index.to(dev), n_keys)
    if not dense_fast_path_available(q):
        is_dense = torch.zeros_like(is_dense)

    # Dense heads: one fused call per KV head for the dense query heads of its group.
    if bool(is_dense.any()):
        for g in range(hkv):
            heads = [h for h in range(g * group, (g + 1) * group) if bool(is_dense[h])]
            if not heads:
                continue
            k_g, v_g = dense_kv(g)  # [S, D] each
            o, l = dense_attention_lse(q[:, heads].transpose(0, 1), k_g, v_g, index.q_offset, scale)
            out[heads, :tq] = o
            lse[heads, :tq] = l

    # Sparse rows, sorted by key count so each chunk pads to a similar length.
    n_flat = torch.where(is_dense[:, None], 0, n_keys).reshape(-1)
    order = torch.argsort(n_flat, stable=True)
    counts = n_flat[order].tolist()
    first = next((i for i, c in enumerate(counts) if c > 0), len(counts))
    q_blocks = torch.nn.functional.pad(q.transpose(0, 1), (0, 0, 0, nqb * bm - tq))  # [Hq, NQB*bm, D]
    q_blocks = q_blocks.reshape(hq * nqb, bm, d)
    out_rows, lse_rows = out.view(hq * nqb, bm, d), lse.view(hq * nqb, bm)
    seg_start, seg_len = seg_start.view(hq * nqb, -1), seg_len.view(hq * nqb, -1)
    i = first
    while i < len(counts):
        # widest chunk whose padded size stays in budget (counts ascend, so the last row is longest)
        j = i + 1
        while j < len(counts) and (j + 1 - i) * counts[j] <= KEY_SLOT_BUDGET:
            j += 1
        rows = order[i:j]
        length = counts[j - 1]
        pos, valid = expand_segments(seg_start[rows], seg_len[rows], length)
        qb = rows % nqb
        q_pos = index.q_offset + qb[:, None] * bm + torch.arange(bm, device=dev)  # [n, bm]
        tile = max(1, KEY_SLOT_BUDGET // (j - i))
        o, l = attend_rows(q_blocks[rows], q_pos, pos, valid, rows // nqb // group, gather, scale, tile)
        out_rows[rows] = o
        lse_rows[rows] = l
        i = j
    return out[:, :tq], lse[:, :tq]


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
    out, lse = _prefill_core(
        q, contiguous_gather(k, v), lambda g: (k[:, g], v[:, g]), index, k.shape[1], scale
    )
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
    must cover ``index.seq_len`` positions. Only the selected positions are read, except for heads
    the index keeps dense, which read their KV head's whole prefix.
    """
    _check_inputs(q, index, k_cache.shape[1], k_cache.shape[3], "sparse_prefill_paged")
    bs = k_cache.shape[2]
    if block_table_row.shape[0] * bs < index.seq_len:
        raise ValueError(
            f"sparse_prefill_paged: block table row covers {block_table_row.shape[0]} blocks x {bs} "
            f"tokens, fewer than seq_len {index.seq_len}"
        )
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale

    def dense_kv(g: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = paged_to_contiguous(k_cache[:, g : g + 1], block_table_row, index.seq_len)  # [S, 1, D]
        v = paged_to_contiguous(v_cache[:, g : g + 1], block_table_row, index.seq_len)
        return k[:, 0], v[:, 0]

    gather = paged_gather(k_cache, v_cache, block_table_row)
    out, lse = _prefill_core(q, gather, dense_kv, index, k_cache.shape[1], scale)
    out = out.transpose(0, 1).to(q.dtype)
    return (out, lse) if return_lse else out
