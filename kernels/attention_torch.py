"""Torch building blocks shared by the CPU prefill and decode paths.

* ``attend``: softmax attention of a batch of padded rows (queries x gathered keys) under a
  boolean mask, returning the log-sum-exp. On CPU it runs torch's fused flash kernel (AMX/AVX
  bf16 matmuls with fp32 accumulation, fp32 softmax); elsewhere plain fp32 matmuls.
* ``dense_attention_lse``: dense causal attention with a query offset (later prefill chunks).
* ``merge_partials``: combine results over disjoint key sets by their LSEs.
* ``chunks``: split rows sorted by work into batches whose padded size fits a budget.
"""

from __future__ import annotations

import torch

# Key slots (rows x keys) attended per call: bounds the gathered K/V (2 x slots x D) and the
# mask/scores (slots x queries per row) to tens of MB, small enough for cache-friendly CPU work.
KEY_SLOT_BUDGET = 1 << 16

_NEG_INF = float("-inf")


def _flash_cpu_ok(q: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of padded rows under a mask.

    q: ``[n, M, D]``; k, v: ``[n, L, D]`` (same dtype as q); allowed: ``[n, M, L]`` or ``[n, 1, L]``
    bool. Returns ``out [n, M, D]`` fp32 (0 where a query keeps no key) and ``lse [n, M]`` fp32
    (-inf there).
    """
    n, m, d = q.shape
    any_key = allowed.any(-1).expand(n, m)  # [n, M]
    if _flash_cpu_ok(q) and k.dtype == q.dtype:
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, _NEG_INF)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, None], k[:, None], v[:, None], attn_mask=bias[:, None], scale=scale
        )[:2]
        out, lse = out[:, 0].float(), lse[:, 0]
    else:
        scores = torch.bmm(q.float() * scale, k.float().transpose(1, 2))  # [n, M, L]
        scores = scores.masked_fill(~allowed, _NEG_INF)
        lse = torch.logsumexp(scores, -1)
        probs = torch.exp(scores - torch.where(any_key, lse, 0.0)[..., None])
        out = torch.bmm(probs, v.float())
    # the fused kernel reports lse 0 for a fully masked row: make "no key" explicit
    out = torch.where(any_key[..., None], out, 0.0)
    lse = torch.where(any_key, lse, _NEG_INF)
    return out, lse


def merge_partials(
    o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-normalised partial results over disjoint key sets by their LSEs.

    o: ``[..., D]``, l: ``[...]`` (-inf = no key). Returns fp32 ``(out, lse)``.
    """
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    w1 = torch.exp(l1 - safe)[..., None]
    w2 = torch.exp(l2 - safe)[..., None]
    return o1.float() * w1 + o2.float() * w2, lse


def dense_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention of the query heads of one GQA group to their KV head (CPU).

    q: ``[G, Tq, D]`` at positions ``q_offset..``; k, v: ``[S, D]``, ``S = q_offset + Tq``.
    Returns ``out [G, Tq, D]`` fp32 and ``lse [G, Tq]`` fp32.
    """
    g, tq, d = q.shape
    q4 = q[None]  # [1, G, Tq, D]
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def kv(x: torch.Tensor) -> torch.Tensor:
        return x[None, None].expand(1, g, x.shape[0], d)  # broadcast the KV head, no copy

    # The fused kernel aligns its causal mask top-left, so a later chunk is split into the prefix
    # (fully visible) and the chunk itself (a causal square), merged by their LSEs.
    o_c, l_c = op(q4, kv(k[q_offset:]), kv(v[q_offset:]), is_causal=True, scale=scale)[:2]
    if q_offset == 0:
        return o_c[0].float(), l_c[0]
    o_p, l_p = op(q4, kv(k[:q_offset]), kv(v[:q_offset]), is_causal=False, scale=scale)[:2]
    return merge_partials(o_p[0], l_p[0], o_c[0], l_c[0])


def dense_fast_path_available(q: torch.Tensor) -> bool:
    """Whether ``dense_attention_lse`` can serve q (CPU tensors in fp32/bf16/fp16)."""
    return _flash_cpu_ok(q)


def chunks(work: list[int], budget: int = KEY_SLOT_BUDGET):
    """Yield ``(i, j, width)`` batches over rows sorted by ascending work, each with
    ``(j - i) * width <= budget`` (one row at least); rows with no work are skipped."""
    i = next((r for r, w in enumerate(work) if w > 0), len(work))
    while i < len(work):
        j = i + 1
        while j < len(work) and (j + 1 - i) * work[j] <= budget:
            j += 1
        yield i, j, work[j - 1]
        i = j


def in_sorted_ranges(pos: torch.Tensor, start: torch.Tensor, end: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``[n, L]`` bool: pos inside one of each row's sorted disjoint ranges ``[start, end)``.

    pos: ``[n, L]`` long; start, end: ``[n, R]`` long; count: ``[n]`` valid ranges per row.
    """
    r_max = start.shape[1]
    slot = torch.arange(r_max, device=pos.device)
    big = torch.iinfo(torch.int64).max
    # padding ranges sort last and are empty, so searchsorted never lands inside one
    st = torch.where(slot < count[:, None], start, big)
    r = torch.searchsorted(st, pos.contiguous(), right=True) - 1
    hit_end = torch.gather(end, 1, r.clamp(min=0))
    return (r >= 0) & (pos < hit_end)
