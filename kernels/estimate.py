"""The estimation maths dynamic patterns run before attention, as plain torch functions.

Each function takes and returns tensors only, so a Triton version can be dispatched at the top of
each one (on CUDA) without touching the pattern builders that call them. GQA: ``kv_heads[h]`` is
the KV head query head ``h`` reads; K is read per KV head, never repeated per query head.

Scores are fp32 whatever the input dtype: they are summed over many positions and then ranked,
and bf16 sums would reorder near-ties between runs of different chunking.
"""

from __future__ import annotations

import math

import torch

from .dispatch import triton_estimate

_CHUNK_ELEMS = 1 << 24  # ~64 MB of fp32 scores at a time; bounds memory at long lengths


def _scale(d: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(d) if scale is None else scale


def _by_kv_head(kv_heads: torch.Tensor):
    """Yield ``(kv_head, query-head indices)`` for each KV head in use."""
    kv_heads = kv_heads.long()
    for g in torch.unique(kv_heads).tolist():
        yield g, torch.nonzero(kv_heads == g).flatten()


def last_q_probs(q_last: torch.Tensor, k: torch.Tensor, kv_heads: torch.Tensor, q_pos: torch.Tensor,
                 scale: float | None = None) -> torch.Tensor:
    """Causal softmax of the probe queries over every key, fp32.

    q_last: ``[L, H, D]`` probe queries at absolute positions ``q_pos`` ``[L]``.
    k:      ``[S, Hkv, D]`` every key of the sequence.
    Returns ``[H, L, S]``; keys after a probe's position get probability 0.
    """
    s = k.shape[0]
    sc = _scale(q_last.shape[-1], scale)
    out = torch.empty(q_last.shape[1], q_last.shape[0], s, dtype=torch.float32, device=q_last.device)
    future = torch.arange(s, device=k.device).view(1, -1) > q_pos.view(-1, 1).to(k.device)  # [L, S]
    for g, hs in _by_kv_head(kv_heads):
        logits = torch.einsum("lhd,sd->hls", q_last[:, hs].float(), k[:, g].float()) * sc
        logits.masked_fill_(future, float("-inf"))
        out[hs] = torch.softmax(logits, dim=-1)
    return out


def vertical_slash_scores(q_last: torch.Tensor, k: torch.Tensor, kv_heads: torch.Tensor, q_pos: torch.Tensor,
                          scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal mass of the probe queries' attention (MInference's estimate).

    Returns ``vertical [H, S]`` (sum over probes of each key column's probability) and
    ``slash [H, S]`` indexed by diagonal offset ``o = query position - key position``.
    Heads are processed in chunks so the ``[h, L, S]`` probabilities stay bounded in memory.
    """
    if (tr := triton_estimate(q_last, q_last.shape[-1])) is not None:  # CUDA: Triton, same results
        return tr.vertical_slash_scores(q_last, k, kv_heads, q_pos, scale)
    h_total, l_len = q_last.shape[1], q_last.shape[0]
    s = k.shape[0]
    dev = q_last.device
    vertical = torch.zeros(h_total, s, dtype=torch.float32, device=dev)
    slash = torch.zeros(h_total, s, dtype=torch.float32, device=dev)
    # offset of every (probe, key) pair; future keys have probability 0, so clamping them is harmless
    offs = (q_pos.view(-1, 1).to(dev) - torch.arange(s, device=dev).view(1, -1)).clamp(min=0).view(1, -1)
    per = max(1, _CHUNK_ELEMS // max(1, l_len * s))
    for h0 in range(0, h_total, per):
        hs = torch.arange(h0, min(h_total, h0 + per), device=dev)
        probs = last_q_probs(q_last[:, hs], k, kv_heads[hs], q_pos, scale)  # [h, L, S]
        vertical[hs] = probs.sum(1)
        part = torch.zeros(len(hs), s, dtype=torch.float32, device=dev)
        part.scatter_add_(1, offs.expand(len(hs), -1), probs.reshape(len(hs), -1))
        slash[hs] = part
    return vertical, slash


def topk_forced(scores: torch.Tensor, k: int, forced: torch.Tensor | None = None,
                allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` items of each row with ``forced`` items always in and ``allowed`` as a filter.

    scores: ``[..., N]``; forced / allowed: bool, broadcastable to it. Forced items count toward
    ``k`` (a budget is a budget) unless there are more forced items than ``k``: then all forced are
    kept. Returns ``(keep [..., N] bool, count [...])``.
    """
    n = scores.shape[-1]
    s = scores.float().clone()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if forced is not None:
        forced = forced.expand_as(s) if allowed is None else (forced & allowed).expand_as(s)
        s = s.masked_fill(forced, float("inf"))
    kk = min(k, n)
    keep = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    if kk > 0:
        top = torch.topk(s, kk, dim=-1).indices
        keep.scatter_(-1, top, True)
    keep &= s > float("-inf")
    if forced is not None:
        keep |= forced
    return keep, keep.sum(-1)


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of ``x [T, H, D]`` over blocks of ``block`` rows -> ``[H, NB, D]`` fp32 (last block partial)."""
    t, h, d = x.shape
    nb = -(-t // block)
    pad = nb * block - t
    xs = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad)).view(nb, block, h, d).sum(1)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = block - pad
    return (xs / counts.view(nb, 1, 1)).transpose(0, 1)


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, kv_heads: torch.Tensor, block_q: int, block_k: int,
                        scale: float | None = None) -> torch.Tensor:
    """Scores of mean-pooled query blocks against mean-pooled key blocks.

    q: ``[Tq, H, D]``; k: ``[S, Hkv, D]``. Returns ``[H, NQB, NKB]`` fp32 (no causal mask applied:
    the caller knows where the chunk sits).
    """
    sc = _scale(q.shape[-1], scale)
    qp = pool_blocks(q, block_q)  # [H, NQB, D]
    kp = pool_blocks(k, block_k)  # [Hkv, NKB, D]
    out = torch.empty(qp.shape[0], qp.shape[1], kp.shape[1], dtype=torch.float32, device=q.device)
    for g, hs in _by_kv_head(kv_heads):
        out[hs] = torch.einsum("hqd,kd->hqk", qp[hs], kp[g]) * sc
    return out


def block_max_scores(q: torch.Tensor, k: torch.Tensor, kv_heads: torch.Tensor, positions: torch.Tensor,
                     block_q: int, scale: float | None = None) -> torch.Tensor:
    """For each query block, the best score any of its queries gives each listed key (HiP).

    q: ``[Tq, H, D]``; k: ``[S, Hkv, D]``; positions: ``[H, NQB, M]`` long key positions (any value
    in ``[0, S)``; callers mask the invalid ones afterwards). Returns ``[H, NQB, M]`` fp32 of
    ``max_{i in block} q_i . k_pos``. Padded queries of a partial last block are ignored.
    """
    tq, h, d = q.shape
    nqb = -(-tq // block_q)
    sc = _scale(d, scale)
    pad = nqb * block_q - tq
    qb = torch.nn.functional.pad(q.float(), (0, 0, 0, 0, 0, pad)).view(nqb, block_q, h, d)
    q_valid = (torch.arange(nqb * block_q, device=q.device) < tq).view(nqb, block_q, 1)
    out = torch.empty(positions.shape, dtype=torch.float32, device=q.device)
    m = positions.shape[-1]
    per = max(1, _CHUNK_ELEMS // max(1, block_q * m * h))  # query blocks per chunk
    for b0 in range(0, nqb, per):
        b1 = min(nqb, b0 + per)
        for g, hs in _by_kv_head(kv_heads):
            keys = k[:, g].float()[positions[hs, b0:b1]]  # [h, nb, M, D]
            s = torch.einsum("bqhd,hbmd->hbqm", qb[b0:b1][:, :, hs], keys) * sc
            s = s.masked_fill(~q_valid[b0:b1].view(1, b1 - b0, block_q, 1), float("-inf"))
            out[hs, b0:b1] = s.amax(2)
    return out


def gather_cached_keys(k_cache: torch.Tensor, block_table: torch.Tensor, max_len: int) -> torch.Tensor:
    """Logical keys of every request from the paged cache: ``[B, max_len, Hkv, D]`` (tail is junk).

    k_cache: ``[num_blocks, Hkv, block_size, D]`` (a strided view of vLLM's cache is fine).
    block_table: ``[B, max_blocks]`` int32.
    """
    bsz = k_cache.shape[2]
    nblk = -(-max_len // bsz)
    pages = k_cache[block_table[:, :nblk].long()]  # [B, nblk, Hkv, bs, D]
    b, _, hkv, _, d = pages.shape
    return pages.permute(0, 1, 3, 2, 4).reshape(b, nblk * bsz, hkv, d)[:, :max_len]


def decode_scores(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  kv_heads: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Pre-softmax scores of each request's new query against its cached keys (TidalDecode).

    q: ``[B, H, D]``. Returns ``[B, H, max(seq_lens)]`` fp32, ``-inf`` past each request's length.
    """
    if (tr := triton_estimate(q, q.shape[-1])) is not None:  # CUDA: reads the paged cache in place
        return tr.decode_scores(q, k_cache, block_table, seq_lens, kv_heads, scale)
    max_len = int(seq_lens.max().item())
    sc = _scale(q.shape[-1], scale)
    keys = gather_cached_keys(k_cache, block_table, max_len)  # [B, S, Hkv, D]
    out = torch.empty(q.shape[0], q.shape[1], max_len, dtype=torch.float32, device=q.device)
    for g, hs in _by_kv_head(kv_heads):
        out[:, hs] = torch.einsum("bhd,bsd->bhs", q[:, hs].float(), keys[:, :, g].float()) * sc
    past = torch.arange(max_len, device=q.device).view(1, 1, -1) >= seq_lens.view(-1, 1, 1).to(q.device)
    return out.masked_fill_(past, float("-inf"))


def page_min_max(k_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of the keys of every ``page_size``-token page (Quest's metadata).

    Returns ``(kmin, kmax)`` ``[B, P, Hkv, D]`` fp32 with ``P = ceil(max(seq_lens) / page_size)``;
    positions past a request's length are ignored (a page with none has min +inf, max -inf).
    """
    if (tr := triton_estimate(k_cache, k_cache.shape[-1])) is not None:  # CUDA: reads the paged cache in place
        return tr.page_min_max(k_cache, block_table, seq_lens, page_size)
    max_len = int(seq_lens.max().item())
    n_pages = -(-max_len // page_size)
    keys = gather_cached_keys(k_cache, block_table, max_len).float()  # [B, S, Hkv, D]
    b, _, hkv, d = keys.shape
    keys = torch.nn.functional.pad(keys, (0, 0, 0, 0, 0, n_pages * page_size - max_len))
    valid = (torch.arange(n_pages * page_size, device=keys.device).view(1, -1) < seq_lens.view(-1, 1).to(keys.device))
    valid = valid.view(b, n_pages, page_size, 1, 1)
    paged = keys.view(b, n_pages, page_size, hkv, d)
    kmin = paged.masked_fill(~valid, float("inf")).amin(2)
    kmax = paged.masked_fill(~valid, float("-inf")).amax(2)
    return kmin, kmax


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, kv_heads: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of ``q . k`` over a page: ``sum_d max(q_d * min_d, q_d * max_d)``.

    q: ``[B, H, D]``; kmin, kmax: ``[B, P, Hkv, D]``. Returns ``[B, H, P]`` fp32; empty pages -inf.
    """
    kv = kv_heads.long().to(q.device)
    lo, hi = kmin[:, :, kv], kmax[:, :, kv]  # [B, P, H, D]: one page row per head, small (P << S)
    qf = q.float().unsqueeze(1)  # [B, 1, H, D]
    bound = torch.maximum(qf * lo, qf * hi)
    empty = torch.isinf(lo[..., 0]) & (lo[..., 0] > 0)  # min stayed +inf: no token in the page
    bound = torch.nan_to_num(bound, nan=0.0).sum(-1)  # 0 * inf = nan only occurs on empty pages
    return bound.masked_fill(empty, float("-inf")).transpose(1, 2)
