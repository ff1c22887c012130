"""Whole cache pages: the keys vLLM's CPU op reads for a sparse index or a decode selection.

The op attends to whole pages of the paged cache (``cpu_ops``), so a kept key set that is not made
of whole pages is read rounded up to the pages it touches: ``page_mask`` marks those pages per
(head, query block), ``merge_blocks`` joins runs of blocks into one virtual request (the union of
their pages), ``page_index`` turns the result back into a ``SparseIndex`` and ``page_round_windows``
widens a decode window to whole pages. ``cpu_ops`` schedules op calls from these; hosts without the
paged op (the transformers integration, the profiler's timings) run the same rounding so that they
attend to exactly the keys the engine attends to.
"""

from __future__ import annotations

import torch

from headwise.kernels.index import DecodeMode, DecodeSelection, SparseIndex


def page_mask(index: SparseIndex, page: int) -> torch.Tensor:
    """``[H, NQB, P]`` bool: the cache pages each (head, query block) must read to see every key
    its index keeps, its own span included (a superset when kept keys are not whole pages)."""
    h, nqb = index.num_heads, index.num_q_blocks
    num_pages = -(-index.seq_len // page)
    start = index.q_offset + torch.arange(nqb) * index.block_m
    end = torch.clamp(start + index.block_m, max=index.seq_len)
    # ranges: +1 at the first page touched, -1 past the last, then a running sum over pages
    marks = torch.zeros(h, nqb, num_pages + 1, dtype=torch.int32)
    valid = torch.arange(index.range_start.shape[2]) < index.range_count[..., None]
    rs, re = index.range_start.long(), torch.minimum(index.range_end.long(), end.view(1, -1, 1))
    valid &= rs < re
    first = torch.where(valid, rs // page, num_pages)
    last = torch.where(valid, -(-re // page), num_pages)
    marks.scatter_add_(2, first, valid.to(torch.int32))
    marks.scatter_add_(2, last, -valid.to(torch.int32))
    mask = marks.cumsum(2, dtype=torch.int32)[..., :num_pages] > 0
    if index.columns.shape[2]:
        cvalid = torch.arange(index.columns.shape[2]) < index.column_count[..., None]
        cols = torch.where(cvalid, index.columns.long() // page, num_pages)
        extra = torch.zeros(h, nqb, num_pages + 1, dtype=torch.bool)
        extra.scatter_(2, cols, cvalid)
        mask |= extra[..., :num_pages]
    # the block's own span: its pages close every row (the op's causal mask needs them last)
    pos = torch.arange(num_pages)
    own = (pos[None, :] >= (start // page)[:, None]) & (pos[None, :] < (-(-end // page))[:, None])
    return mask | own[None]


def _in_slots(flags: torch.Tensor, count: torch.Tensor, width: int, shift: int) -> torch.Tensor:
    """``[H, NQB, width]`` int32: the positions (plus ``shift``) where ``flags [H, NQB, P]`` is set,
    ascending in each row, ``P`` after the ``count`` of them."""
    h, nqb, p = flags.shape
    at = torch.nonzero(flags)  # [N, 3], row-major: ascending positions within each row
    row = at[:, 0] * nqb + at[:, 1]
    before = torch.cumsum(count.view(-1).long(), 0) - count.view(-1).long()  # entries of earlier rows
    out = torch.full((h * nqb, width), p, dtype=torch.int32)
    out[row, torch.arange(at.shape[0]) - before[row]] = (at[:, 2] + shift).to(torch.int32)
    return out.view(h, nqb, width)


def page_index(index: SparseIndex, page: int, merge: int = 1) -> SparseIndex:
    """The index vLLM's op actually computes for ``index``: every page ``page_mask`` marks (with
    ``merge`` blocks per virtual request, the union of each run's pages: ``merge_blocks``), as key
    ranges (causal on top). Hosts without the paged op (the transformers integration) run it to
    attend to exactly the keys the engine attends to on the same machine."""
    mask = page_mask(index.to("cpu"), page)  # [H, NQB, P]
    h, nqb, p = mask.shape
    if merge > 1:
        runs, _, _ = merge_blocks(mask, torch.zeros(nqb), torch.zeros(nqb), merge)
        mask = runs[:, torch.arange(nqb) // merge]
    prev = torch.nn.functional.pad(mask, (1, 0))[..., :p]
    nxt = torch.nn.functional.pad(mask, (0, 1))[..., 1:]
    starts, ends = mask & ~prev, mask & ~nxt
    count = starts.sum(-1).to(torch.int32)
    width = max(int(count.max()) if count.numel() else 0, 1)
    # each row's run starts / ends in order, padding after them: placed from the nonzero list (as
    # many entries as runs), never a sort over every page of every row
    first = _in_slots(starts, count, width, 0)
    last = _in_slots(ends, count, width, 1)
    rs = (first * page).clamp(max=index.seq_len)
    re = (last * page).clamp(max=index.seq_len)
    empty = torch.zeros(h, nqb, 0, dtype=torch.int32)
    return SparseIndex(rs, re, count, empty, torch.zeros(h, nqb, dtype=torch.int32), index.q_len,
                       index.q_offset, index.block_m).to(index.device)


def merge_blocks(mask: torch.Tensor, start: torch.Tensor, end: torch.Tensor, merge: int):
    """Runs of ``merge`` consecutive query blocks as one virtual request each: the union of their
    pages (``mask [H, NQB, P]``), from the first block's start to the last one's end. Exact in its
    causal part (the blocks' own pages are the row's last, in order) and a superset elsewhere:
    a block also reads the pages its neighbours keep before it."""
    h, nqb, p = mask.shape
    if merge <= 1 or nqb <= 1:
        return mask, start, end
    groups = -(-nqb // merge)
    padded = torch.nn.functional.pad(mask, (0, 0, 0, groups * merge - nqb))
    last = torch.clamp(torch.arange(groups) * merge + merge - 1, max=nqb - 1)
    return padded.view(h, groups, merge, p).any(2), start[::merge], end[last]


def block_merge(page: int, block_m: int) -> int:
    """Query blocks per virtual request: those that share a cache page read (nearly) the same pages.
    (128-token pages, 64-query blocks: 3.96 -> 3.44 ms for the default plan's 2K chunk at 32K.)"""
    return max(1, page // block_m)


def page_round_windows(sel: DecodeSelection, seq_lens: torch.Tensor, page: int) -> DecodeSelection:
    """The selection vLLM's op computes for ``sel``: each WINDOW row's sink and window widened to
    whole ``page``-token pages (a superset; the window still ends at the current token). Dense rows
    are unchanged. ``seq_lens [B]`` include the current token."""
    length = seq_lens.to(sel.window.device).long().view(-1, 1)
    sink = torch.minimum(-(-sel.sink.long() // page) * page, length)
    first = torch.clamp(length - sel.window.long(), min=0) // page * page  # first kept page's first token
    window = length - first
    win = sel.mode == int(DecodeMode.WINDOW)
    return DecodeSelection(sel.mode, torch.where(win, sink, sel.sink.long()).to(torch.int32),
                           torch.where(win, window, sel.window.long()).to(torch.int32), sel.indices, sel.count,
                           sel.block_size)
