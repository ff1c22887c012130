"""Torch building blocks shared by the CPU prefill and decode paths.

* ``attend_rows``: attention of padded "rows" (a block of queries and the list of key positions
  they may read) with key tiling and an online softmax in fp32, so no score matrix is larger than
  one tile of one chunk.
* ``dense_attention_lse``: dense causal attention (with a query offset) through torch's fused CPU
  flash kernel, returning the log-sum-exp too; used for heads whose index covers everything.
* Gatherers: read K/V rows at ``(position, kv_head)`` from contiguous ``[S, Hkv, D]`` tensors or
  from a paged cache ``[num_blocks, Hkv, block_size, D]`` through a block table, without copying
  the whole prefix.
"""

from __future__ import annotations

from typing import Callable

import torch

# Key slots (rows x keys) attended per step: bounds the gathered K/V (2 x slots x D floats) and
# the scores (slots x 64 queries) to a few tens of MB, small enough for cache-friendly CPU work.
KEY_SLOT_BUDGET = 1 << 16

Gather = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def contiguous_gather(k: torch.Tensor, v: torch.Tensor) -> Gather:
    """Gather from k, v: ``[S, Hkv, D]`` (any strides)."""

    def gather(pos: torch.Tensor, kvh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # pos: [n, L] long positions; kvh: [n] long KV head -> two [n, L, D]
        h = kvh[:, None]
        return k[pos, h], v[pos, h]

    return gather


def paged_gather(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor) -> Gather:
    """Gather from paged caches ``[num_blocks, Hkv, block_size, D]``.

    block_table: ``[max_blocks]`` (one request) or ``[n, max_blocks]`` (one row per gathered row).
    """
    bs = k_cache.shape[2]
    table = block_table.long()

    def gather(pos: torch.Tensor, kvh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # pos: [n, L]; kvh: [n]
        logical = pos // bs
        blk = table[logical] if table.dim() == 1 else torch.gather(table, 1, logical)
        off = pos % bs
        h = kvh[:, None].expand_as(pos)
        return k_cache[blk, h, off], v_cache[blk, h, off]

    return gather


def attend_rows(
    q_rows: torch.Tensor,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    kvh: torch.Tensor,
    gather: Gather,
    scale: float,
    tile: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each row's queries over its listed keys, causal on positions.

    q_rows: ``[n, M, D]``; q_pos: ``[n, M]`` long query positions (a query reads keys <= its
    position); key_pos, key_valid: ``[n, L]``; kvh: ``[n]``. Keys are processed ``tile`` at a time
    with a running max/sum (the flash-attention recurrence) in fp32.
    Returns ``out [n, M, D]`` fp32 (0 where a query keeps no key) and ``lse [n, M]`` (-inf there).
    """
    n, m, d = q_rows.shape
    qf = q_rows.float() * scale  # fold the scale into q once
    run_max = torch.full((n, m), float("-inf"), dtype=torch.float32, device=q_rows.device)
    run_sum = torch.zeros(n, m, dtype=torch.float32, device=q_rows.device)
    acc = torch.zeros(n, m, d, dtype=torch.float32, device=q_rows.device)
    for t0 in range(0, key_pos.shape[1], tile):
        pos = key_pos[:, t0 : t0 + tile]
        kt, vt = gather(pos, kvh)  # [n, t, D]
        scores = torch.bmm(qf, kt.float().transpose(1, 2))  # [n, M, t]
        allowed = key_valid[:, None, t0 : t0 + tile] & (pos[:, None, :] <= q_pos[:, :, None])
        scores.masked_fill_(~allowed, float("-inf"))
        new_max = torch.maximum(run_max, scores.amax(-1))
        # rows that have seen no key yet keep max -inf; subtract 0 there to avoid inf - inf
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        p = torch.exp(scores - safe_max[..., None])
        correction = torch.exp(run_max - safe_max)
        run_sum = run_sum * correction + p.sum(-1)
        acc = acc * correction[..., None] + torch.bmm(p, vt.float())
        run_max = new_max
    empty = run_sum == 0
    out = acc / torch.where(empty, torch.ones_like(run_sum), run_sum)[..., None]
    lse = torch.where(empty, torch.full_like(run_sum, float("-inf")), run_max + torch.log(run_sum))
    return out, lse


def _flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    # q: [1, G, T, D]; k, v: [1, G, S, D] (expanded views are fine) -> out [1, G, T, D], lse [1, G, T]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal, scale=scale)[:2]


def dense_fast_path_available(q: torch.Tensor) -> bool:
    """The fused kernel exists for CPU tensors in fp32/bf16 (other cases take the row path)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def merge_partials(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor):
    """Combine two softmax-normalised partial results over disjoint key sets by their LSEs."""
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w1 = torch.exp(l1 - safe)[..., None]
    w2 = torch.exp(l2 - safe)[..., None]
    return o1.float() * w1 + o2.float() * w2, lse


def dense_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention of the queries of one GQA group to their KV head.

    q: ``[G, Tq, D]`` queries at positions ``q_offset..``; k, v: ``[S, D]`` with ``S = q_offset + Tq``.
    Returns ``out [G, Tq, D]`` fp32 and ``lse [G, Tq]`` fp32.
    """
    g, tq, d = q.shape
    q4 = q[None]  # [1, G, Tq, D]

    def kv(x: torch.Tensor) -> torch.Tensor:
        return x[None, None].expand(1, g, x.shape[0], d)  # broadcast the KV head, no copy

    # The fused kernel's causal mask is aligned top-left, so a later chunk is split into the
    # prefix (fully visible) and the chunk itself (causal square), merged by their LSEs.
    o_c, l_c = _flash_cpu(q4, kv(k[q_offset:]), kv(v[q_offset:]), True, scale)
    if q_offset == 0:
        return o_c[0].float(), l_c[0]
    o_p, l_p = _flash_cpu(q4, kv(k[:q_offset]), kv(v[:q_offset]), False, scale)
    out, lse = merge_partials(o_p[0], l_p[0], o_c[0], l_c[0])
    return out, lse
