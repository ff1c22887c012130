"""The prefill builders as they were before issue 12 (whole-prompt masks, host syncs), kept as
oracles: the streamed, bounded-memory builders must give the same index on the property matrix."""

from __future__ import annotations

import torch

from headwise.kernels import estimate
from headwise.kernels.index import SparseIndex
from headwise.patterns.ranges import block_bounds, compact, make_index, merge_intervals, no_columns, ranges_from_mask


def block_sparse_before(p, inp) -> SparseIndex:
    block = inp.block_m
    dev = inp.q.device
    bs, be = block_bounds(inp.q_offset, inp.q_len, block, dev)
    scores = estimate.pooled_block_scores(inp.q, inp.k[: inp.seq_len], inp.kv_heads, block, block, inp.scale)
    kb = torch.arange(scores.shape[-1], device=dev).view(1, -1)
    allowed = kb * block < be.view(-1, 1)
    forced = torch.zeros_like(allowed)
    if p.force_sink:
        forced |= kb == 0
    if p.force_diagonal:
        forced |= (kb >= (bs // block).view(-1, 1)) & (kb <= ((be - 1) // block).view(-1, 1))
    keep, _ = estimate.topk_forced(scores, p.top_k, forced=forced & allowed, allowed=allowed)
    rs, re, rc = ranges_from_mask(keep, block, inp.seq_len)
    cols, cc = no_columns(len(inp.heads), bs.shape[0], dev)
    return make_index(rs, re, rc, cols, cc, inp.q_len, inp.q_offset, block)


def _descend(q, k, kv_heads, cand, cand_n, chunk: int, keep_n: int, limit, block_m: int, scale):
    """One stage: keep ``keep_n`` of each row's ``cand_n`` candidate units by greedy halving.

    cand: ``[H, NQB, M]`` ascending unit start positions (valid below ``cand_n``); units are
    ``chunk`` tokens, clipped at ``limit`` ``[1, NQB, 1]`` (the end of the candidate region).
    Returns the kept unit starts (ascending, padded) and their counts.
    """
    dev = cand.device
    n = keep_n
    m = cand.shape[-1]
    i = torch.arange(n + 1, device=dev)
    # n groups partition [0, cand_n) evenly (rows with cand_n <= n get groups of size 0 or 1)
    bounds = (cand_n[..., None] * i) // n  # [H, NQB, n + 1]
    gs, ge = bounds[..., :-1], bounds[..., 1:]
    while bool(((ge - gs) > 1).any()):
        mid = (gs + ge + 1) // 2  # a size-1 group keeps itself as the left half, right half empty
        hs = torch.cat([gs, mid], -1)
        he = torch.cat([mid, ge], -1)
        live = he > hs
        rep_unit = torch.gather(cand, -1, ((hs + he - 1) // 2).clamp(0, m - 1))
        rep = torch.minimum(rep_unit + chunk // 2, limit - 1).clamp(min=0)
        score = estimate.block_max_scores(q, k, kv_heads, rep, block_m, scale).masked_fill(~live, float("-inf"))
        top = torch.topk(score, n, dim=-1).indices
        gs, ge = torch.gather(hs, -1, top), torch.gather(he, -1, top)
    live = ge > gs
    return compact(torch.gather(cand, -1, gs.clamp(0, m - 1)), live)


def hierarchical_before(p, inp) -> SparseIndex:
    if inp.q is None or inp.k is None:
        raise ValueError("hierarchical needs q and k: it scores representative keys")
    q, k, dev = inp.q, inp.k, inp.q.device
    h = len(inp.heads)
    bs, be = block_bounds(inp.q_offset, inp.q_len, inp.block_m, dev)
    nqb = bs.shape[0]
    # candidate region [sink, win_start): everything the sink and window do not already cover
    win_start = torch.clamp(bs - p.window + 1, min=0)
    lo = min(p.sink, inp.seq_len)
    limit = torch.clamp(win_start, min=lo).view(1, nqb, 1)
    # stage 1 candidates: aligned units of the first chunk size starting at the sink
    c0 = p.stages[0].chunk
    m0 = max(1, -(-(int(limit.max().item()) - lo) // c0))
    cand = (lo + torch.arange(m0, device=dev) * c0).view(1, 1, m0).expand(h, nqb, m0)
    cand_n = ((limit - lo).clamp(min=0) + c0 - 1) // c0
    cand_n = cand_n.view(1, nqb).expand(h, nqb)
    chunk = c0
    for i, stage in enumerate(p.stages):
        if i > 0:  # split every kept unit into units of this stage's chunk
            ratio = chunk // stage.chunk
            sub = cand[..., :, None] + torch.arange(ratio, device=dev) * stage.chunk  # [H, NQB, M, ratio]
            ok = (torch.arange(cand.shape[-1], device=dev) < cand_n[..., None])[..., None] & (sub < limit[..., None])
            cand, cand_n = compact(sub.flatten(-2), ok.flatten(-2))
            chunk = stage.chunk
        cand, cand_n = _descend(q, k, inp.kv_heads, cand, cand_n, chunk, stage.budget // chunk, limit,
                                inp.block_m, inp.scale)
        cand = cand[..., : max(1, int(cand_n.max().item()))]
    live = torch.arange(cand.shape[-1], device=dev) < cand_n[..., None]
    sel_s, sel_e = cand, torch.minimum(cand + chunk, limit)
    sink_s = torch.zeros(h, nqb, 1, dtype=torch.long, device=dev)
    sink_e = torch.full_like(sink_s, lo).minimum(be.view(1, -1, 1))
    win_s, win_e = win_start.view(1, -1, 1).expand(h, nqb, 1), be.view(1, -1, 1).expand(h, nqb, 1)
    starts = torch.cat([sink_s, win_s, sel_s], -1)
    ends = torch.cat([sink_e, win_e, sel_e], -1)
    valid = torch.cat([torch.ones(h, nqb, 2, dtype=torch.bool, device=dev), live], -1)
    rs, re, rc = merge_intervals(starts, ends, valid)
    cols, cc = no_columns(h, nqb, dev)
    return make_index(rs, re, rc, cols, cc, inp.q_len, inp.q_offset, inp.block_m)


