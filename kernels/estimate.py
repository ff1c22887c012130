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

_CHUNK_ELEMS = 1 << 22  # ~16 MB of fp32 scores at a time (HiP's block maxima); bounds memory at long lengths
_PROBE_TILE_ELEMS = 1 << 20  # (probe, key) logits per tile of the vertical-slash estimate (4 MB of fp32)


def _scale(d: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(d) if scale is None else scale


def _per_head(x: torch.Tensor, kv_heads: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` with its KV-head axis ``axis`` replaced by one entry per query head (``kv_heads[h]``).

    A gather, not a host loop over groups: no ``unique``/``nonzero`` sync, so the same code runs
    inside a captured CUDA step. Callers only use it on small tiles (pooled blocks, a key tile).
    """
    return x.index_select(axis, kv_heads.to(x.device).long())


def fixed_shapes(t: torch.Tensor | None) -> bool:
    """Whether code on ``t``'s device must avoid host syncs (CUDA, or forced for tests).

    On CUDA, builders size their outputs from budgets (padding) instead of reading counts back;
    on CPU a host read is free, and trimming padding is cheaper for the kernels after.
    """
    return FORCE_FIXED_SHAPES or (t is not None and t.is_cuda)


FORCE_FIXED_SHAPES = False  # tests run the CUDA code path on CPU under a sync detector

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
    kvh = kv_heads.to(k.device).long()
    for h in range(q_last.shape[1]):  # one head at a time: [L, S] transient
        logits = (q_last[:, h].float() @ k.index_select(1, kvh[h:h + 1])[:, 0].float().T) * sc
        logits.masked_fill_(future, float("-inf"))
        out[h] = torch.softmax(logits, dim=-1)
    return out


def vertical_slash_scores(q_last: torch.Tensor, k: torch.Tensor, kv_heads: torch.Tensor, q_pos: torch.Tensor,
                          scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal mass of the probe queries' attention (MInference's estimate).

    Returns ``vertical [H, S]`` (sum over probes of each key column's probability) and
    ``slash [H, S]`` indexed by diagonal offset ``o = query position - key position``.
    Key tiles are visited twice (the log-sum-exp of each probe, then its probabilities), so the
    transient memory is ``[L, tile]`` per head, never ``[H, L, S]`` (as the Triton version does).
    """
    if (tr := triton_estimate(q_last, q_last.shape[-1])) is not None:  # CUDA: Triton, same results
        return tr.vertical_slash_scores(q_last, k, kv_heads, q_pos, scale)
    h_total, l_len = q_last.shape[1], q_last.shape[0]
    s = k.shape[0]
    dev = q_last.device
    sc = _scale(q_last.shape[-1], scale)
    vertical = torch.zeros(h_total, s, dtype=torch.float32, device=dev)
    slash = torch.zeros(h_total, s + 1, dtype=torch.float32, device=dev)  # slot s: future pairs (p = 0)
    q_pos = q_pos.to(dev).long().view(-1, 1)  # [L, 1]
    # probes at consecutive positions (the chunk's last queries): a diagonal of p is a diagonal of
    # the probe x key tile, summed through a strided view instead of a scatter
    consecutive = l_len > 0 and bool((q_pos[:, 0] == q_pos[0, 0] + torch.arange(l_len, device=dev)).all())
    kvh = kv_heads.to(dev).long()
    for g in torch.unique(kvh).tolist():
        hs = torch.nonzero(kvh == g).squeeze(1)  # the query heads reading KV head g, scored together
        n = hs.numel()
        qg = q_last.index_select(1, hs).float().transpose(0, 1).reshape(n * l_len, -1)  # [n*L, D]
        pos = q_pos.repeat(n, 1)  # [n*L, 1]
        tile = max(64, _PROBE_TILE_ELEMS // max(1, n * l_len))

        def logits(t0: int, t1: int) -> torch.Tensor:  # [n*L, t] with -inf on future keys
            x = (qg @ k[t0:t1, g].float().T) * sc
            return x.masked_fill_(torch.arange(t0, t1, device=dev).view(1, -1) > pos, float("-inf"))

        m = torch.full((n * l_len, 1), float("-inf"), device=dev)
        z = torch.zeros(n * l_len, 1, device=dev)
        for t0 in range(0, s, tile):
            x = logits(t0, min(s, t0 + tile))
            m_new = torch.maximum(m, x.amax(-1, keepdim=True))
            z = z * torch.exp(m - m_new).nan_to_num_(0.0) + torch.exp(x - m_new).nan_to_num_(0.0).sum(-1, keepdim=True)
            m = m_new
        lse = m + torch.log(z)
        for t0 in range(0, s, tile):
            t1 = min(s, t0 + tile)
            p = torch.exp(logits(t0, t1) - lse).view(n, l_len, t1 - t0)  # [n, L, t]
            vertical[hs, t0:t1] = p.sum(1)
            if consecutive:
                _add_diagonals(slash, hs, p, int(q_pos[0, 0]) - t0)
            else:
                offs = (q_pos - torch.arange(t0, t1, device=dev).view(1, -1)).expand(n, -1, -1)
                idx = torch.where(offs >= 0, offs, s).reshape(n, -1)
                slash[hs] = slash[hs].scatter_add_(1, idx, p.reshape(n, -1))
    return vertical, slash[:, :s]


def _add_diagonals(slash: torch.Tensor, heads: torch.Tensor, p: torch.Tensor, first: int) -> None:
    """``slash[h, o] += p[h, l, j]`` over every ``o = first + l - j >= 0`` (probe ``l`` at position
    ``first + l + t0``, key ``t0 + j``): each diagonal of ``p [n, L, t]`` summed through a strided view
    of ``p`` padded by ``L - 1`` zeros on both sides."""
    n, l_len, t = p.shape
    padded = torch.nn.functional.pad(p, (l_len - 1, l_len - 1))  # [n, L, t + 2L - 2], contiguous
    width = padded.shape[2]
    # diag[h, c] = sum over l of p[h, l, j] with j - l = c - (L - 1)
    diag = padded.as_strided((n, l_len, t + l_len - 1), (l_len * width, width + 1, 1)).sum(1)
    o_max, o_min = first + l_len - 1, first - t + 1  # offsets of c = 0 and c = t + L - 2
    lo = max(o_min, 0)
    if o_max < lo:
        return
    slash[heads, lo:o_max + 1] += diag.flip(1)[:, lo - o_min:]


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


def pool_blocks(x: torch.Tensor, block: int, pass_elems: int = 1 << 22) -> torch.Tensor:
    """Mean of ``x [T, H, D]`` over blocks of ``block`` rows -> ``[H, NB, D]`` fp32 (last block partial).

    Whole blocks are pooled ``pass_elems`` input elements at a time, so the fp32 copy of ``x`` is
    never held whole (``x`` may be the keys of a million-token context).
    """
    t, h, d = x.shape
    nb = -(-t // block)
    out = torch.empty(nb, h, d, dtype=torch.float32, device=x.device)
    per = max(1, pass_elems // max(1, block * h * d))  # blocks per pass
    for b0 in range(0, nb, per):
        b1 = min(nb, b0 + per)
        part = x[b0 * block: min(t, b1 * block)].float()
        pad = (b1 - b0) * block - part.shape[0]  # only in the last block: zeros leave its sum exact
        part = torch.nn.functional.pad(part, (0, 0, 0, 0, 0, pad)) if pad else part
        out[b0:b1] = part.view(b1 - b0, block, h, d).sum(1)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = block - (nb * block - t)
    return (out / counts.view(nb, 1, 1)).transpose(0, 1)


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, kv_heads: torch.Tensor, block_q: int, block_k: int,
                        scale: float | None = None) -> torch.Tensor:
    """Scores of mean-pooled query blocks against mean-pooled key blocks.

    q: ``[Tq, H, D]``; k: ``[S, Hkv, D]``. Returns ``[H, NQB, NKB]`` fp32 (no causal mask applied:
    the caller knows where the chunk sits). The whole matrix: for tests and short prompts only;
    builders stream it with ``pooled_score_tiles``.
    """
    return torch.cat([t for _, t in pooled_score_tiles(q, k, kv_heads, block_q, block_k, scale)], -1)


def pooled_score_tiles(q: torch.Tensor, k: torch.Tensor, kv_heads: torch.Tensor, block_q: int, block_k: int,
                       scale: float | None = None, tile_elems: int = 1 << 22):
    """Yield ``(first key block, scores [H, NQB, t])`` over tiles of pooled key blocks, in order.

    Transient memory is one tile (at most ``tile_elems`` fp32 scores, from at most ``tile_elems``
    raw key elements) plus its pooled keys; the keys are pooled tile by tile too, so nothing of
    size S is held besides ``k`` itself.
    """
    sc = _scale(q.shape[-1], scale)
    qp = pool_blocks(q, block_q)  # [H, NQB, D]
    s = k.shape[0]
    nkb = -(-s // block_k)
    # key blocks per tile: at most tile_elems scores, and at most tile_elems raw key elements pooled
    per = max(1, min(tile_elems // max(1, qp.shape[0] * qp.shape[1]), tile_elems // max(1, block_k * k[0].numel())))
    for k0 in range(0, nkb, per):
        k1 = min(nkb, k0 + per)
        kp = _per_head(pool_blocks(k[k0 * block_k: min(s, k1 * block_k)], block_k), kv_heads, 0)  # [H, t, D]
        yield k0, torch.bmm(qp, kp.transpose(1, 2)) * sc


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
    q_valid = (torch.arange(nqb * block_q, device=q.device) < tq).view(nqb, block_q, 1)
    out = torch.empty(positions.shape, dtype=torch.float32, device=q.device)
    m = positions.shape[-1]
    kvh = kv_heads.to(k.device).long().view(-1, 1, 1)
    per = max(1, (_CHUNK_ELEMS >> 2) // max(1, max(block_q, d) * m * h))  # query blocks per chunk
    for b0 in range(0, nqb, per):
        b1 = min(nqb, b0 + per)
        part = q[b0 * block_q: min(tq, b1 * block_q)].float()  # this chunk's queries only, in fp32
        pad = (b1 - b0) * block_q - part.shape[0]  # the last block's padding (masked below)
        qb = (torch.nn.functional.pad(part, (0, 0, 0, 0, 0, pad)) if pad else part).view(b1 - b0, block_q, h, d)
        keys = k[positions[:, b0:b1], kvh].float()  # [h, nb, M, D]: only the listed keys
        s = torch.einsum("bqhd,hbmd->hbqm", qb, keys) * sc
        s = s.masked_fill(~q_valid[b0:b1].view(1, b1 - b0, block_q, 1), float("-inf"))
        out[:, b0:b1] = s.amax(2)
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
    max_len = int(seq_lens.max().item())  # the whole [B, H, S] matrix: tests and short contexts only
    sc = _scale(q.shape[-1], scale)
    keys = gather_cached_keys(k_cache, block_table, max_len)  # [B, S, Hkv, D]
    out = torch.einsum("bhd,bshd->bhs", q.float(), _per_head(keys, kv_heads, 2).float()) * sc
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
