"""Torch building blocks shared by the CPU prefill and decode paths.

* ``flash``: one call of torch's fused CPU flash-attention kernel (bf16 matmuls with fp32
  accumulation, fp32 softmax) on 4-d views, with a plain fp32 fallback off the CPU. It accepts
  strided, overlapping and stride-0 (broadcast) K/V views, so callers slide windows over one K/V
  buffer and share a KV head across its query heads without copying.
* ``attend``: softmax attention of padded rows under a boolean mask, with the log-sum-exp.
* ``dense_attention_lse``: dense causal attention with a query offset (later prefill chunks).
* ``merge_partials``: combine results over disjoint key sets by their LSEs.
* ``chunks``: split rows sorted by work into batches whose padded size fits a budget (decode).

Why the shapes matter on a CPU (Sapphire Rapids, AMX, one thread; ns per (query, key) pair):
the fused kernel splits each (batch, head) into query tiles and packs K/V once per (batch, head),
so its cost per pair falls with the queries M that share one K/V list: about 3.1 at M = 64,
2.1 at M = 32 (too small to pack), 2.0 at 128, 1.3 at 192, 1.1 at 256 and 0.85 from 768 on,
against 0.68 per kept pair for dense causal attention. ``pair_cost`` holds that curve; the
prefill planner uses it to decide how many query blocks and heads share one call.
"""

from __future__ import annotations

import torch

# Key slots (rows x keys) attended per decode call: bounds the gathered K/V and the mask.
KEY_SLOT_BUDGET = 1 << 16

_NEG_INF = float("-inf")
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# (queries sharing one K/V list, relative ns per pair), measured as described in the docstring;
# M = 64 is served as two halves of 32 (see ``flash``), hence the same cost as 32.
_PAIR_COST = ((32, 2.1), (64, 2.1), (128, 2.0), (192, 1.3), (256, 1.15), (384, 1.05), (512, 1.0),
              (768, 0.9))


def pair_cost(m: int) -> float:
    """Relative cost of one (query, key) pair when ``m`` queries share a key list."""
    cost = _PAIR_COST[0][1]
    for size, c in _PAIR_COST:
        if m >= size:
            cost = c
    return cost


def fused_cpu_ok(q: torch.Tensor) -> bool:
    """Whether torch's fused CPU flash kernel serves q (CPU tensors in fp32/bf16/fp16)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16) and _FLASH is not None


def _reference(q, k, v, bias, causal, scale):
    # plain fp32 attention with the same broadcasting rules, for devices without the fused kernel
    scores = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))  # [n, H, M, L]
    if bias is not None:
        scores = scores + bias.float()
    if causal:
        m, l = scores.shape[-2:]
        tri = torch.ones(m, l, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~tri, _NEG_INF)
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(probs, v.float()).to(q.dtype), lse


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
          causal: bool = False, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [n, H, M, D]`` to ``k, v [n, H, L, D]`` (any strides; broadcast dims as
    stride 0), with an additive ``bias`` (0 / -inf) broadcastable to ``[n, H, M, L]`` and/or a
    top-left aligned causal mask. Returns ``out [n, H, M, D]`` in q's dtype and ``lse [n, H, M]``
    fp32. A query whose keys are all masked comes back with out 0 and an undefined lse: callers
    that can produce one say so with ``no_key``.

    With one head of M = 64 queries (no causal flag), the call runs as two halves of 32 queries
    on the head axis: the kernel does not pack K/V for 32 queries, which costs less than packing
    for 64 (see the module docstring).
    """
    n, h, m, d = q.shape
    if not fused_cpu_ok(q):
        return _reference(q, k, v, bias, causal, scale)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if m == 64 and h == 1 and not causal and (bias is None or bias.shape[1] == 1):
        l = k.shape[2]
        if bias is not None and bias.shape[2] == m:  # a bias per query: split it like the queries
            bias = bias.reshape(bias.shape[0], 2, 32, l)
        o, lse = _FLASH(q.reshape(n, 2, 32, d), k.expand(n, 2, l, d), v.expand(n, 2, l, d),
                        attn_mask=bias, scale=scale)[:2]
        return o.view(n, 1, m, d), lse.reshape(n, 1, m)
    o, lse = _FLASH(q, k, v, is_causal=causal, attn_mask=bias, scale=scale)[:2]
    return o, lse


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
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, _NEG_INF)
    out, lse = flash(q[:, None], k[:, None], v[:, None], bias[:, None], scale=scale)
    out, lse = out[:, 0].float(), lse[:, 0]
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
    out = torch.mul(o1, w1)  # promotes a bf16 partial to fp32 in the same pass
    out.addcmul_(o2.float() if o2.dtype != out.dtype else o2, w2)
    return out, lse


def dense_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention of the query heads of one GQA group to their KV head.

    q: ``[G, Tq, D]`` at positions ``q_offset..``; k, v: ``[S, D]``, ``S = q_offset + Tq``.
    Returns ``out [G, Tq, D]`` (q's dtype when ``q_offset`` is 0, else fp32) and ``lse [G, Tq]`` fp32.
    """
    g, tq, d = q.shape
    q4 = q[None]  # [1, G, Tq, D]

    def kv(x: torch.Tensor) -> torch.Tensor:
        return x[None, None].expand(1, g, x.shape[0], d)  # broadcast the KV head, no copy

    # The fused kernel aligns its causal mask top-left, so a later chunk is split into the prefix
    # (fully visible) and the chunk itself (a causal square), merged by their LSEs.
    o_c, l_c = flash(q4, kv(k[q_offset:]), kv(v[q_offset:]), causal=True, scale=scale)
    if q_offset == 0:
        return o_c[0], l_c[0]
    o_p, l_p = flash(q4, kv(k[:q_offset]), kv(v[:q_offset]), scale=scale)
    return merge_partials(o_p[0], l_p[0], o_c[0], l_c[0])


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
