"""Dense-masked fp32 attention: the slow, obviously-correct oracle every kernel test compares with.

The sparse formats expand themselves into boolean masks (``SparseIndex.to_dense_mask``,
``DecodeSelection.to_dense_mask``); these functions run plain softmax attention under such a mask.
They repeat K/V per query head and build full score matrices on purpose: they are for small test
shapes, never for serving.
"""

from __future__ import annotations

import math

import torch


def _masked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [H, T, D]  k, v: [H, S, D]  mask: [H, T, S] bool; all fp32
    scores = torch.matmul(q, k.transpose(1, 2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, T]; -inf where a row keeps no key
    probs = torch.exp(scores - lse[..., None].clamp(min=torch.finfo(torch.float32).min))
    probs = torch.where(mask, probs, torch.zeros_like(probs))
    return torch.matmul(probs, v), lse


def masked_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query to the keys ``mask`` allows, in fp32.

    q: ``[Tq, Hq, D]``; k, v: ``[S, Hkv, D]``; mask: ``[Hq, Tq, S]`` bool. Query head ``h`` reads
    KV head ``h // (Hq // Hkv)``. Returns ``out [Tq, Hq, D]`` fp32 (0 for a query with no key)
    and ``lse [Hq, Tq]`` fp32, the natural log-sum-exp of the scaled scores (-inf for such a query).
    """
    tq, hq, d = q.shape
    s, hkv, _ = k.shape
    if hq % hkv:
        raise ValueError(f"masked_attention_reference: {hq} query heads is not a multiple of {hkv} KV heads")
    if tuple(mask.shape) != (hq, tq, s):
        raise ValueError(f"masked_attention_reference: mask has shape {tuple(mask.shape)}, expected {(hq, tq, s)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = hq // hkv
    qh = q.float().transpose(0, 1)  # [Hq, Tq, D]
    kh = k.float().transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, S, D]
    vh = v.float().transpose(0, 1).repeat_interleave(group, dim=0)
    out, lse = _masked_softmax_attention(qh, kh, vh, mask, scale)
    return out.transpose(0, 1).contiguous(), lse


def paged_to_contiguous(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Read positions ``0..length-1`` of one request out of a paged cache.

    cache: ``[num_blocks, Hkv, block_size, D]`` (a strided view is fine); block_table_row:
    ``[max_blocks]`` int. Returns ``[length, Hkv, D]``.
    """
    bs = cache.shape[2]
    pos = torch.arange(length, device=cache.device)
    blocks = block_table_row.long()[pos // bs]
    return cache[blocks, :, pos % bs]  # [length, Hkv, D]


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of a batch under a dense mask, in fp32, one request at a time.

    q: ``[B, Hq, D]``; k_cache, v_cache: ``[num_blocks, Hkv, block_size, D]``; block_table
    ``[B, max_blocks]``; seq_lens ``[B]``; mask ``[B, H, >= max(seq_lens)]`` bool with H = Hq, or
    H = Hkv (then shared by each GQA group). Returns ``out [B, Hq, D]`` fp32, ``lse [B, Hq]`` fp32.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = hq // hkv
    if mask.shape[1] not in (hq, hkv):
        raise ValueError(f"decode_attention_reference: mask has {mask.shape[1]} heads, expected {hq} or {hkv}")
    outs, lses = [], []
    for r in range(b):
        n = int(seq_lens[r])
        k = paged_to_contiguous(k_cache, block_table[r], n)  # [n, Hkv, D]
        v = paged_to_contiguous(v_cache, block_table[r], n)
        m = mask[r, :, :n]
        if m.shape[0] != hq:
            m = m.repeat_interleave(group, dim=0)  # [Hq, n]
        o, lse = masked_attention_reference(q[r][None], k, v, m[:, None, :], scale)  # o: [1, Hq, D]
        outs.append(o[0])
        lses.append(lse[:, 0])
    return torch.stack(outs), torch.stack(lses)
