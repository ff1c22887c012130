"""How the CPU prefill splits a ``SparseIndex`` into work the fused CPU kernel runs fast.

The fused CPU flash kernel is fast when many queries share one key list and when K/V need no
copy (see ``attention_torch``). Sparse patterns have two kinds of structure that allow both:

* *near* keys are anchored to the query block: a sliding window, MInference's local diagonals,
  S2's local blocks, a forced diagonal block. For a block starting at ``bs`` they are the range
  ``[bs - b, be)`` with the same width ``b`` for (almost) every block of a head, so they are read
  as overlapping windows of one K buffer (no copy) under one relative mask shared by every block.
* *far* keys are everything below ``bs - b``: sinks, vertical columns, strided shards, top-k
  blocks. All queries of a block see all of them (no causal mask). Sinks, columns and shards are
  *nested*: each block sees the keys of one list below its own start, so the list is gathered once
  and many blocks share a call (``nested_far``, ``prefix_chunks``); other far keys are gathered
  per block (measured: unions over several blocks under membership masks never paid off).

Rows (one per query block) fall into: *dense prefix* (leading blocks that keep every causal key:
dense causal attention), *regular* (the band of width ``b`` is fully kept), *short* (the block's
own span is kept but the band is narrower: diagonal block only) and *broken* (the block's own span
is not fully kept: diagonal block under an explicit mask). Heads of one KV group whose indices
are identical are planned once and computed together (their queries stacked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_torch import pair_cost
from .index import SparseIndex

BIG = 2**62  # sorts after every position: marks padding


@dataclass
class HeadPlan:
    """The work of one set of query heads with identical indices (one KV head).

    dense_rows: leading blocks computed by dense causal attention.
    band:       keys below a regular block's first query that its near window covers.
    regular, short, broken: ``[NQB]`` bool row kinds (see the module docstring).
    far_start:  ``[NQB]`` long; a row's far keys are its keys below this position.
    """

    heads: list[int]
    kv_head: int
    dense_rows: int
    band: int
    regular: torch.Tensor
    short: torch.Tensor
    broken: torch.Tensor
    far_start: torch.Tensor


def block_bounds(index: SparseIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """``[NQB]`` long: absolute position of each block's first query, and one past its last."""
    start = index.q_offset + torch.arange(index.num_q_blocks, device=index.device) * index.block_m
    return start, torch.clamp(start + index.block_m, max=index.seq_len)


def own_range(index: SparseIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """``avail [H, NQB]`` long: how far below its first query the range holding a block's own span
    reaches (-1 when no single range covers the span), and ``dense [H, NQB]``: that range starts at 0."""
    bs, be = block_bounds(index)
    h, nqb = index.num_heads, index.num_q_blocks
    valid = torch.arange(index.range_start.shape[2], device=index.device) < index.range_count[..., None]
    rs, re = index.range_start.long(), index.range_end.long()
    st = torch.where(valid, rs, BIG)
    r = torch.searchsorted(st, bs.view(1, -1, 1).expand(h, nqb, 1).contiguous(), right=True) - 1
    s = torch.gather(rs, 2, r.clamp(min=0))[..., 0]
    e = torch.gather(re, 2, r.clamp(min=0))[..., 0]
    covers = (r[..., 0] >= 0) & (e >= be)
    return torch.where(covers, bs - s, -1), covers & (s == 0)


def head_sets(index: SparseIndex, group: int) -> list[list[int]]:
    """Query heads grouped by KV head and identical index content (padding ignored)."""
    h = index.num_heads
    r_ok = torch.arange(index.range_start.shape[2], device=index.device) < index.range_count[..., None]
    c_ok = torch.arange(index.columns.shape[2], device=index.device) < index.column_count[..., None]
    sig = torch.cat([torch.where(r_ok, index.range_start, -1).view(h, -1),
                     torch.where(r_ok, index.range_end, -1).view(h, -1),
                     torch.where(c_ok, index.columns, -1).view(h, -1)], 1)
    sets: list[list[int]] = []
    for g in range(h // group):
        reps: list[list[int]] = []
        for hh in range(g * group, (g + 1) * group):
            same = next((s for s in reps if torch.equal(sig[s[0]], sig[hh])), None)
            if same is None:
                reps.append([hh])
            else:
                same.append(hh)
        sets.extend(reps)
    return sets


def plan_heads(index: SparseIndex, heads: list[int], group: int, avail: torch.Tensor,
               dense: torch.Tensor, allow_dense: bool) -> HeadPlan:
    """Classify the rows of one head set (rows of ``avail``/``dense`` for its first head)."""
    h0 = heads[0]
    bs, _ = block_bounds(index)
    nqb = index.num_q_blocks
    a, dn = avail[h0], dense[h0]
    j = int(torch.cumprod(dn.long(), 0).sum()) if allow_dense else 0
    rest = a[j:]
    rest = rest[rest >= 0]
    band = int(torch.mode(rest).values) if rest.numel() else 0
    after = torch.arange(nqb, device=a.device) >= j
    regular = after & (a >= band)
    short = after & (a >= 0) & (a < band)
    broken = after & (a < 0)
    far_start = torch.where(regular, bs - band, torch.where(after, bs, 0))
    return HeadPlan(heads, h0 // group, j, band, regular, short, broken, far_start)


def band_chunk(band: int, rows: int, stacked: int, block_m: int, pair_budget: int | None = None) -> int:
    """Blocks per near call: wider chunks share K/V among more queries but read keys that only
    the chunk's first blocks need (``band + chunk`` keys per query). With ``pair_budget``, a chunk
    stays within it (the call's band mask holds that many entries): a wide band at long context
    runs one block per call rather than a mask of 16 blocks x the band."""
    best, best_cost = 1, None
    k = 1
    while k <= max(1, rows) and k <= 16:
        if k > 1 and pair_budget is not None and stacked * k * block_m * (band + k * block_m) > pair_budget:
            break
        cost = (band + k * block_m) * pair_cost(stacked * k * block_m)
        if best_cost is None or cost < best_cost:
            best, best_cost = k, cost
        k *= 2
    return best


def keys_below(rs, re, rc, cs, cc, x):
    """``[n, P]``: how many of each row's keys lie below ``x [n, P]`` (ranges sorted, disjoint)."""
    r_ok = torch.arange(rs.shape[1], device=rs.device) < rc[:, None]
    cum = torch.cumsum(torch.where(r_ok, re - rs, 0), 1)
    i = torch.searchsorted(torch.where(r_ok, rs, BIG).contiguous(), x, right=False)  # ranges starting below x
    prev = (i - 1).clamp(min=0)
    in_r = torch.where(i > 0, torch.gather(cum, 1, prev) - (torch.gather(re, 1, prev) - x).clamp(min=0), 0)
    c_ok = torch.arange(cs.shape[1], device=cs.device) < cc[:, None]
    in_c = torch.searchsorted(torch.where(c_ok, cs, BIG).contiguous(), x, right=False)
    return in_r + in_c


def row_tensors(index: SparseIndex, head: int, rows: torch.Tensor):
    """The ranges and columns of ``rows`` of ``head`` as long tensors ``rs, re, rc, cs, cc``."""
    return (index.range_start[head, rows].long(), index.range_end[head, rows].long(),
            index.range_count[head, rows].long(), index.columns[head, rows].long(),
            index.column_count[head, rows].long())


def expand_segments(seg_start: torch.Tensor, seg_len: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded lists of the integers covered by segments ``[start, start + len)`` per row.

    seg_start, seg_len: ``[n, G]`` long. Returns values ``[n, length]`` (BIG in padding) and valid
    ``[n, length]``. Slot j of a row falls in the segment whose running end first exceeds j.
    """
    ends = torch.cumsum(seg_len, dim=1)  # [n, G]
    slots = torch.arange(length, device=seg_len.device).expand(seg_len.shape[0], length).contiguous()
    seg = torch.searchsorted(ends, slots, right=True).clamp(max=seg_len.shape[1] - 1)  # [n, L]
    val = torch.gather(seg_start, 1, seg) + (slots - torch.gather(ends - seg_len, 1, seg))
    valid = slots < ends[:, -1:]
    return torch.where(valid, val, BIG), valid


def _compact(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Move each row's kept values to its front (order kept), BIG after them; trimmed to the
    longest row. A scatter, not a sort: attention does not care about key order."""
    n, w = values.shape
    slot = torch.where(keep, torch.cumsum(keep.long(), 1) - 1, w)
    out = torch.full((n, w + 1), BIG, dtype=torch.long, device=values.device)
    out.scatter_(1, slot, torch.where(keep, values, BIG))
    return out[:, : max(1, int(keep.sum(1).max()))]


def far_keys(index: SparseIndex, head: int, rows: torch.Tensor, far_start: torch.Tensor) -> torch.Tensor:
    """``[n, U]`` positions of each row's keys below ``far_start [n]`` (ranges expanded, then
    columns; BIG in padding). Rows are read one block at a time: measured on the CPU, reading the
    union of several blocks' far keys under a membership mask never paid for its extra work."""
    dev = rows.device
    rs, re, rc, cs, cc = row_tensors(index, head, rows)
    start = far_start[:, None]
    r_ok = (torch.arange(rs.shape[1], device=dev) < rc[:, None]) & (rs < start)
    seg_len = torch.where(r_ok, torch.minimum(re, start) - rs, 0)
    r_pos, r_valid = expand_segments(torch.where(r_ok, rs, 0), seg_len, max(1, int(seg_len.sum(1).max())))
    c_ok = (torch.arange(cs.shape[1], device=dev) < cc[:, None]) & (cs < start)
    return _compact(torch.cat([r_pos, cs], 1), torch.cat([r_valid, c_ok], 1))


def in_ranges(pos: torch.Tensor, start: torch.Tensor, end: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``[n, L]`` bool: pos inside one of the first ``count`` sorted disjoint ranges of its row
    (ranges past ``count`` must not start before the live ones: they are ignored)."""
    slot = torch.arange(start.shape[1], device=pos.device)
    st = torch.where(slot < count[:, None], start, BIG)
    r = torch.searchsorted(st.contiguous(), pos.contiguous(), right=True) - 1
    return (r >= 0) & (pos < torch.gather(end, 1, r.clamp(min=0)))


def nested_far(index: SparseIndex, head: int, rows: torch.Tensor, far_start: torch.Tensor, n_far: torch.Tensor):
    """When every row's far keys are exactly the keys of one sorted list below the row's far start
    (sinks, vertical columns, strided shards: rows differ only in how far up they reach), return
    that list ``[U*]`` (the widest row's far keys) and each row's count ``m [n]``; else None.

    Exact: a row's set equals the list's keys below its start iff it has as many keys and each of
    its ranges and columns lies in the list (a range ``[a, e)`` lies in a sorted unique list iff
    ``a`` and ``e - 1`` are in it ``e - 1 - a`` places apart)."""
    w = int(torch.argmax(far_start))
    keys = far_keys(index, head, rows[w:w + 1], far_start[w:w + 1])[0]
    keys = torch.sort(keys[keys < BIG]).values
    if keys.numel() == 0:
        return None
    m = torch.searchsorted(keys, far_start.contiguous())
    if not bool((m == n_far).all()):
        return None
    rs, re, rc, cs, cc = row_tensors(index, head, rows)
    start = far_start[:, None]
    last = keys.numel() - 1

    def found(x: torch.Tensor):  # index of x in keys, and whether it is there
        i = torch.searchsorted(keys, x.contiguous()).clamp(max=last)
        return i, keys[i] == x

    r_ok = (torch.arange(rs.shape[1], device=rs.device) < rc[:, None]) & (rs < start)
    e = torch.minimum(re, start) - 1
    ia, ha = found(rs)
    ie, he = found(e)
    inside = ha & he & (ie - ia == e - rs)
    c_ok = (torch.arange(cs.shape[1], device=cs.device) < cc[:, None]) & (cs < start)
    if not bool((inside | ~r_ok).all()) or not bool((found(cs)[1] | ~c_ok).all()):
        return None
    return keys, m


PAIR_BUDGET = 1 << 22  # (query, key) pairs per kernel call: bounds masks (8 MB in bf16) and gathers
QUERY_BUDGET = 1 << 13  # queries per near-row or far call: bounds its q copy, output and mask rows
CALL_PAIRS = 150_000  # one more call (plus its merge) costs about as much as this many padded pairs


def prefix_chunks(m: list[int], per_query_budget: int, queries_per_row: int = 64, slack: float = 0.15,
                  max_rows: int | None = None):
    """Runs ``(i, j, L)`` of consecutive rows sharing the first ``L`` keys of a list, row r seeing
    its first ``m[r]``. A run grows while its padding (pairs computed but masked) stays within
    ``slack`` of the pairs its rows need plus ``CALL_PAIRS`` (what a separate call would cost),
    ``(j - i) * L <= per_query_budget`` and ``j - i <= max_rows`` (short key lists: the run's
    queries, their outputs and mask rows are what fills memory, not the pairs)."""
    i = 0
    while i < len(m):
        j, width, need = i + 1, m[i], m[i]
        while j < len(m) and (max_rows is None or j - i < max_rows):
            w2 = max(width, m[j])
            padded = (j + 1 - i) * w2
            waste = (padded - need - m[j]) * queries_per_row
            if padded > per_query_budget or waste > slack * (need + m[j]) * queries_per_row + CALL_PAIRS:
                break
            width, need, j = w2, need + m[j], j + 1
        yield i, j, max(1, width)
        i = j
