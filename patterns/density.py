"""Expected prefill densities in closed form: the cost never grows with the length asked.

A density is *kept causal (query, key) pairs / all causal pairs* of a ``length``-token prompt.
The index builders produce the exact index of a real prompt; the functions here give the same
number without building it, so ``Plan.summary(length)`` (behind ``GET /v1/headwise/plan``) costs
the same at 10 tokens and at 10^10. Each function says what it is exact against; the tests compare
every one with ``fast_density`` of the built index.

Sums are done in Python integers (exact, no overflow) and divided once at the end.
"""

from __future__ import annotations

import math

import torch

EULER_GAMMA = 0.5772156649015329
# Strided densities are exact up to this many (query block, shard class) rows; beyond it, a
# stratified sample of query blocks of that size (see ``strided_density``).
STRIDED_MAX_ROWS = 1 << 16


def causal_pairs(length: int) -> int:
    """Causal (query, key) pairs of a ``length``-token prompt: ``1 + 2 + ... + length``."""
    return length * (length + 1) // 2 if length > 0 else 0


def capped_pairs(length: int, keys: float) -> float:
    """Kept pairs when query ``t`` (0-based) keeps ``min(t + 1, keys)`` keys."""
    if length <= 0:
        return 0
    n = min(length, max(0, math.floor(keys)))  # queries that keep every earlier key
    return causal_pairs(n) + (length - n) * keys


def density_for_keys(keys: float, length: int) -> float:
    """Causal density when query ``t`` keeps ``min(t + 1, keys)`` keys (0.0 for an empty prompt)."""
    return capped_pairs(length, keys) / causal_pairs(length) if length > 0 else 0.0


def sink_window_density(sink: int, window: int, length: int, block_m: int) -> float:
    """Exact density of ``a_shape.sink_window_index`` (sink + window per query block).

    A block ``[bs, be)`` keeps ``[0, min(sink, be))`` and ``[bs - window + 1, be)``. While the
    window reaches the sink (``bs <= sink + window - 1``) the two merge and the block is dense; past
    that, each query ``p`` keeps ``sink + p + 1 - (bs - window + 1)`` keys. ``window = 0``: each query
    keeps ``min(sink, p + 1)`` keys.
    """
    if length <= 0:
        return 0.0
    if window <= 0:
        return density_for_keys(sink, length)
    b = block_m
    q0 = (sink + window - 1) // b + 1  # first block past the merge: from there on, sink + window apart
    if q0 * b >= length:
        return 1.0
    kept = causal_pairs(q0 * b)  # dense blocks
    n = length - q0 * b  # queries in the sparse blocks
    # sum over sparse-block queries of (sink + window - 1 + p + 1 - bs(p))
    full = length // b  # blocks q0 .. full-1 are whole, then one partial block if length % b
    sum_n_bs = b * b * (full * (full - 1) // 2 - q0 * (q0 - 1) // 2) + (length - full * b) * full * b
    kept += n * (sink + window - 1) + causal_pairs(length) - causal_pairs(q0 * b) - sum_n_bs
    return kept / causal_pairs(length)


def harmonic(n: int) -> float:
    """``H(n) = 1 + 1/2 + ... + 1/n``: summed up to 256, asymptotic series beyond (error < 1e-16)."""
    if n <= 256:
        return math.fsum(1.0 / k for k in range(1, n + 1))
    inv = 1.0 / n
    return math.log(n) + EULER_GAMMA + inv / 2 - inv**2 / 12 + inv**4 / 120


def block_topk_density(top_k: int, length: int, block_m: int) -> float:
    """Closed form of block_sparse's estimate: query block ``i`` keeps ``min(top_k, i + 1)`` of its
    ``i + 1`` causal blocks; blocks weighted by their causal pairs ``b^2 i + b(b+1)/2``."""
    b = block_m
    n = -(-length // b)
    if n <= 0:
        return 0.0
    c = b * (b + 1) / 2
    total = b * b * n * (n - 1) / 2 + n * c
    k = min(top_k, n)
    dense = b * b * k * (k - 1) / 2 + k * c  # blocks 0 .. k-1 keep everything
    # blocks i >= k: top_k * (b^2 i + c) / (i + 1) = top_k * b^2 + top_k * (c - b^2) / (i + 1)
    sparse = (n - k) * top_k * b * b + top_k * (c - b * b) * (harmonic(n) - harmonic(k))
    return (dense + sparse) / total


def _clamped_run(n: torch.Tensor, k: int) -> torch.Tensor:
    """``sum_{x=1..n} clamp(x, 0, k)`` elementwise (0 for ``n <= 0``)."""
    n = n.clamp(min=0)
    return torch.where(n <= k, n * (n + 1) // 2, k * (k + 1) // 2 + (n - k) * k)


def strided_density(local_blocks: int, vert_stride: int, key_block: int, shifts: list[int], length: int,
                    block_m: int) -> float:
    """Density of ``strided.build_prefill`` over heads with the given shifts (``g * step + offset``).

    A query block ``[bs, be)`` whose newest key block is ``L = (be - 1) // K`` keeps key block ``kb``
    when ``kb <= L`` and (``kb > L - local_blocks`` or ``(kb + shift) % vert_stride == 0``); query
    ``p`` reads ``clamp(p + 1 - kb*K, 0, K)`` of its keys. Blocks that end before ``bs`` are whole
    for every query and are counted arithmetically; only the few key blocks overlapping the query
    block are looked at one by one. Exact while (query blocks x shift classes) <= ``STRIDED_MAX_ROWS``;
    longer prompts use that many query blocks, one from the middle of each of equal strata, weighted
    by the stratum's size (the last, partial block is always counted exactly).
    """
    if length <= 0:
        return 0.0
    k, vs, b = key_block, vert_stride, block_m
    classes: dict[int, int] = {}
    for s in shifts:  # heads whose shifts agree modulo the stride keep the same blocks
        classes[(-s) % vs] = classes.get((-s) % vs, 0) + 1
    residue = torch.tensor(list(classes), dtype=torch.long).view(-1, 1, 1)
    weight_h = torch.tensor(list(classes.values()), dtype=torch.long).view(-1, 1)
    nqb = -(-length // b)
    per_class = max(1, STRIDED_MAX_ROWS // len(classes))
    if nqb <= per_class:
        q = torch.arange(nqb, dtype=torch.long)
        w = torch.ones(nqb, dtype=torch.long)
    else:  # strata over the whole blocks; the partial last block (if any) on its own
        whole = length // b
        m = per_class - 1
        edges = torch.tensor([whole * i // m for i in range(m + 1)], dtype=torch.long)
        q = (edges[:-1] + edges[1:]) // 2
        w = edges[1:] - edges[:-1]
        if whole < nqb:
            q, w = torch.cat([q, torch.tensor([whole])]), torch.cat([w, torch.tensor([1])])
    bs = q * b
    be = torch.clamp(bs + b, max=length)
    last = (be - 1) // k
    first_partial = bs // k  # key blocks below this end at or before bs: whole for every query
    local_lo = torch.clamp(last - local_blocks + 1, min=0)
    n_local_full = torch.clamp(first_partial - local_lo, min=0)
    n_shard = torch.minimum(first_partial, local_lo).view(1, -1)  # shard blocks lie in [0, n_shard)
    n_shard_full = torch.clamp((n_shard - residue.view(-1, 1) + vs - 1) // vs, min=0)  # [C, N]
    full = (n_local_full.view(1, -1) + n_shard_full) * k * (be - bs).view(1, -1)
    span = -(-b // k) + 1  # key blocks that can overlap one query block
    kb = first_partial.view(1, -1, 1) + torch.arange(span, dtype=torch.long).view(1, 1, -1)  # [1, N, J]
    kept_kb = (kb <= last.view(1, -1, 1)) & ((kb > (last - local_blocks).view(1, -1, 1))
                                             | ((kb - residue) % vs == 0))
    part = _clamped_run(be.view(1, -1, 1) - kb * k, k) - _clamped_run(bs.view(1, -1, 1) - kb * k, k)
    partial = (part * kept_kb).sum(-1)  # [C, N]
    per_block = (full + partial).double() * w.double().view(1, -1)  # doubles: sums can pass 2^63
    kept = (per_block.sum(-1) * weight_h.double().view(-1)).sum()
    return float(kept.item()) / (causal_pairs(length) * len(shifts))
