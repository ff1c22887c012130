"""Vectorised helpers that turn per-block key sets into ``SparseIndex`` tensors.

Every builder ends the same way: for each (head, query block) it has a bag of key intervals
(sinks, windows, slash windows, selected blocks) and maybe a bag of key columns. These helpers
sort, merge and compact those bags for all blocks at once, with tensor operations only: the
plugin builds indices per layer on the CPU, and a Python loop per block would dominate there.

Shapes: a leading ``[...]`` (usually ``[H, NQB]``) and one trailing axis of items.
"""

from __future__ import annotations

import torch

from headwise.kernels.index import SparseIndex

_BIG = 2**62  # sorts after every real position; marks padding while compacting


def block_bounds(q_offset: int, q_len: int, block_m: int, device: torch.device | str = "cpu"):
    """Absolute positions ``(start, end)`` of every query block of a chunk, each ``[NQB]`` int64."""
    nqb = -(-q_len // block_m)
    start = q_offset + torch.arange(nqb, device=device, dtype=torch.long) * block_m
    end = torch.clamp(start + block_m, max=q_offset + q_len)
    return start, end


def compact(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the kept items of each row to its front, sorted ascending; return ``(values, count)``."""
    vals, _ = torch.sort(torch.where(keep, values.long(), _BIG), dim=-1)
    return vals, keep.sum(-1)


def merge_intervals(starts: torch.Tensor, ends: torch.Tensor, valid: torch.Tensor, presorted: bool = False):
    """Union of the intervals ``[starts, ends)`` of each row as sorted, disjoint ranges.

    starts, ends, valid: ``[..., N]`` (any order; empty or invalid intervals are ignored).
    presorted: the valid intervals of each row already come in ascending start order (invalid
    ones anywhere): the sort is skipped, which is most of the cost on long rows.
    Returns ``(range_start, range_end, range_count)`` with range tensors ``[..., N]`` (valid where
    ``r < range_count``). Touching intervals merge, as the index format requires.
    """
    valid = valid & (ends > starts)
    s = torch.where(valid, starts.long(), _BIG)
    e = torch.where(valid, ends.long(), -1)
    v = valid
    if not presorted:
        order = torch.argsort(s, dim=-1, stable=True)
        s, e, v = torch.gather(s, -1, order), torch.gather(e, -1, order), torch.gather(valid, -1, order)
    # An interval opens a new range when it starts after the furthest end seen so far.
    # (Invalid items sit at the back with end -1, so they never raise the running maximum.)
    reach = torch.cummax(e, dim=-1).values
    prev_reach = torch.cat([torch.full_like(reach[..., :1], -1), reach[..., :-1]], dim=-1)
    opens = v & (s > prev_reach)
    n = s.shape[-1]
    group = torch.where(v, torch.cumsum(opens.long(), -1) - 1, n)  # padding goes to a spare slot
    shape = list(s.shape[:-1]) + [n + 1]
    rs = torch.zeros(shape, dtype=torch.long, device=s.device)
    rs.scatter_(-1, torch.where(opens, group, n), torch.where(opens, s, 0))
    re = torch.full(shape, -1, dtype=torch.long, device=s.device)
    re.scatter_reduce_(-1, group, torch.where(v, e, -1), reduce="amax")
    rc = opens.sum(-1)
    slot = torch.arange(n, device=s.device)
    live = slot < rc[..., None]
    return torch.where(live, rs[..., :n], 0), torch.where(live, re[..., :n], 0), rc


def ranges_from_mask(mask: torch.Tensor, unit: int, seq_len: int):
    """Ranges covering the True units of ``mask`` ``[..., U]``, unit ``u`` = ``[u*unit, (u+1)*unit)``.

    Runs of consecutive units become one range; the last unit is clipped to ``seq_len``.
    """
    u = mask.shape[-1]
    prev = torch.nn.functional.pad(mask[..., :-1], (1, 0), value=False)
    nxt = torch.nn.functional.pad(mask[..., 1:], (0, 1), value=False)
    idx = torch.arange(u, device=mask.device).expand(mask.shape)
    begins, rc = compact(idx, mask & ~prev)
    last, _ = compact(idx, mask & ~nxt)
    live = torch.arange(u, device=mask.device) < rc[..., None]
    rs = torch.where(live, begins * unit, 0)
    re = torch.where(live, torch.clamp((last + 1) * unit, max=seq_len), 0)
    return rs, re, rc


def drop_covered(cols: torch.Tensor, col_valid: torch.Tensor, rs: torch.Tensor, re: torch.Tensor,
                 rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the valid columns that lie outside every range of their row; sorted and unique.

    cols, col_valid: ``[..., V]``; rs, re: ``[..., R]`` sorted disjoint, valid below ``rc``.
    """
    r_live = torch.arange(rs.shape[-1], device=rs.device) < rc[..., None]
    starts = torch.where(r_live, rs.long(), _BIG).contiguous()
    cols = cols.long()
    pos = torch.searchsorted(starts, cols.contiguous(), right=True) - 1  # last range starting <= col
    end_there = torch.gather(torch.where(r_live, re.long(), -1), -1, pos.clamp(min=0))
    inside = (pos >= 0) & (cols < end_there)
    vals, count = compact(cols, col_valid & ~inside)
    # de-duplicate: a repeat equals its left neighbour after sorting
    dup = torch.zeros_like(vals, dtype=torch.bool)
    dup[..., 1:] = vals[..., 1:] == vals[..., :-1]
    live = torch.arange(vals.shape[-1], device=vals.device) < count[..., None]
    return compact(vals, live & ~dup)


def make_index(rs, re, rc, cols, cc, q_len: int, q_offset: int, block_m: int, fixed: bool = False) -> SparseIndex:
    """Assemble a ``SparseIndex`` from ``[H, NQB, *]`` pieces, trimming padding to the widest row.

    fixed: keep the widths the pieces come with (sized from budgets by the caller) instead of
    reading the counts back: no host sync, so a CUDA step stays capturable.
    """
    if fixed:
        r_w, c_w = max(1, rs.shape[-1]), max(1, cols.shape[-1])
    else:
        r_w = max(1, int(rc.max().item()) if rc.numel() else 1)
        c_w = max(1, int(cc.max().item()) if cc.numel() else 1)

    def fit(t: torch.Tensor, w: int) -> torch.Tensor:
        t = t[..., :w]
        if t.shape[-1] < w:
            t = torch.nn.functional.pad(t, (0, w - t.shape[-1]))
        return t

    c_live = torch.arange(c_w, device=cc.device) < cc[..., None]
    cols = torch.where(c_live, fit(cols, c_w), 0)
    return SparseIndex(fit(rs, r_w), fit(re, r_w), rc, cols, cc, q_len, q_offset, block_m)


def no_columns(h: int, nqb: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty column set of an index with ``[h, nqb]`` blocks."""
    return (torch.zeros(h, nqb, 1, dtype=torch.long, device=device),
            torch.zeros(h, nqb, dtype=torch.long, device=device))


def sink_window_intervals(bs: torch.Tensor, be: torch.Tensor, sink: torch.Tensor, window: torch.Tensor):
    """Sink ``[0, sink)`` and a window that gives every query its last ``window`` keys.

    bs, be: ``[NQB]`` block bounds; sink, window: ``[H]``. The block's window range starts
    ``window - 1`` keys before the block's first query, so the first query sees exactly ``window``
    keys (itself included) and later queries of the block see up to ``block_m - 1`` more: an index
    is per block, so the first query sets the floor. Returns ``starts, ends`` ``[H, NQB, 2]``.
    """
    sink = sink.view(-1, 1).long()
    window = window.view(-1, 1).long()
    s_start = torch.zeros(sink.shape[0], bs.shape[0], dtype=torch.long, device=bs.device)
    s_end = torch.minimum(sink.expand(-1, bs.shape[0]), be.view(1, -1))
    w_start = torch.clamp(bs.view(1, -1) - window + 1, min=0)
    w_end = be.view(1, -1).expand_as(w_start)
    w_start = torch.where(window > 0, w_start, w_end)  # window 0: nothing
    return torch.stack([s_start, w_start], -1), torch.stack([s_end, w_end], -1)


def kept_pairs(index: SparseIndex) -> torch.Tensor:
    """Causal (query, key) pairs the index keeps over all its heads: a 0-d int64 tensor on the
    index's device (no host sync), in ``O(H * NQB * (R + C))``.

    For a range ``[s, e)`` and the queries ``p`` of a block ``[bs, be)``, query ``p`` keeps
    ``clamp(min(e, p + 1) - s, 0)`` keys: an arithmetic series while ``p`` is inside the range,
    then the constant ``e - s``. A column ``c`` is kept by the queries ``p >= c``.
    """
    bs, be = block_bounds(index.q_offset, index.q_len, index.block_m, index.device)
    bs, be = bs.view(1, -1, 1), be.view(1, -1, 1)
    r_live = torch.arange(index.range_start.shape[2], device=index.device) < index.range_count[..., None]
    s, e = index.range_start.long(), index.range_end.long()
    a, b = torch.maximum(bs, s), torch.minimum(be, e)
    n = (b - a).clamp(min=0)  # queries inside the range: p - s + 1 for p in [a, b)
    series = n * (a - s + 1) + n * (n - 1) // 2
    after = (be - torch.maximum(bs, e)).clamp(min=0) * (e - s)  # queries past the range end
    kept = ((series + after) * r_live).sum()
    c_live = torch.arange(index.columns.shape[2], device=index.device) < index.column_count[..., None]
    c = index.columns.long()
    return kept + ((be - torch.maximum(bs, c)).clamp(min=0) * c_live).sum()


def fast_density(index: SparseIndex) -> float:
    """Exactly ``index.density()`` (kept over causal pairs), from ``kept_pairs``."""
    n, off = index.q_len, index.q_offset
    causal = (n * off + n * (n + 1) // 2) * index.num_heads
    return float(kept_pairs(index).item()) / causal if causal else 0.0
