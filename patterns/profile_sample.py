"""The profiler's sampled rows: which query rows are scored, their dense attention, and what a
candidate's index keeps of it.

For one prompt and one layer, ``RowSample`` holds the causal softmax of a few query blocks spread
over the second half of the prompt (the last block included, where a question sits) with its
prefix sums. A candidate's index is judged on those rows by ``kept_mass`` (the probability it keeps,
from the prefix sums: no mask is built) and ``output_quality`` (the relative error of the attention
output it gives there). An index may cover a chunk of the prompt (a whole number of query blocks
in), as chunked prefill builds it: the sampled rows are looked up in their own chunk's index.
``patterns.profile.score_layer`` drives them per chunk; ``patterns.profile_decode`` scores decode
selections on the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from headwise.kernels import estimate
from headwise.kernels.index import SparseIndex


# ------------------------------------------------------------------------- sampling
def sample_blocks(seq_len: int, n_blocks: int, block_m: int = 64, tail: int = 0) -> list[int]:
    """Query blocks to score: the last one plus ``n_blocks - 1`` spread evenly over the second half.

    Early queries see few keys, so every pattern keeps nearly all their mass; they say little
    about a pattern and would dilute the average. The last block holds the question of a
    retrieval prompt. ``tail``: the last queries that serving attends densely whatever the
    pattern (the plan's ``dense_tail``): blocks wholly inside it are not scored. Returns sorted,
    unique block numbers.
    """
    nqb = -(-max(0, seq_len - tail) // block_m)
    if nqb == 0 or n_blocks <= 0:
        return []
    first = nqb // 2
    picks = {nqb - 1}
    for i in range(max(0, n_blocks - 1)):
        picks.add(first + (i * (nqb - 1 - first)) // max(1, n_blocks - 1))
    return sorted(picks)


def block_rows(blocks: Sequence[int], seq_len: int, block_m: int = 64) -> torch.Tensor:
    """``[n]`` long: the query positions of the sampled blocks, in order."""
    rows = [torch.arange(b * block_m, min((b + 1) * block_m, seq_len)) for b in blocks]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


def rows_mask(index: SparseIndex, blocks: Sequence[int], width: int | None = None) -> torch.Tensor:
    """``[H, n, width]`` bool: the keys ``index`` lets the sampled blocks' queries read (causal).

    ``blocks``: absolute query block numbers inside the index's queries (an index over a chunk of
    the prompt starts at a whole block, ``q_offset``); ``width`` defaults to the index's keys. The
    semantics of ``SparseIndex.to_dense_mask`` (a block's ranges and columns, then causality per
    row), built per block in ``O(H (S + R + C))``: a range marks ``+1`` at its start and ``-1`` at its
    end and a running sum finds the keys inside one, never an ``[H, R, S]`` tensor.
    """
    s, bm, dev = width or index.seq_len, index.block_m, index.device
    first = _first_block(index, "rows_mask")
    keys = torch.arange(s, device=dev)
    lens = [min(bm, index.q_len - (b - first) * bm) for b in blocks]
    out = torch.empty(index.num_heads, sum(lens), s, dtype=torch.bool, device=dev)
    at = 0
    for b, q_len in zip(blocks, lens):
        i = b - first
        if i < 0 or q_len <= 0:
            raise ValueError(f"rows_mask: block {b} is outside the index's queries "
                             f"[{index.q_offset}, {index.q_offset + index.q_len})")
        rows = b * bm + torch.arange(q_len, device=dev)
        torch.logical_and(_block_keys(index, i, s)[:, None, :], keys.view(1, 1, -1) <= rows.view(1, -1, 1),
                          out=out[:, at : at + q_len])
        at += q_len
    return out


def _block_keys(index: SparseIndex, i: int, s: int) -> torch.Tensor:
    """``[H, s]`` bool: the keys inside query block ``i``'s ranges or among its columns."""
    h, dev = index.num_heads, index.device
    live = torch.arange(index.range_start.shape[2], device=dev) < index.range_count[:, i, None]
    start = index.range_start[:, i].long().clamp(0, s)
    end = index.range_end[:, i].long().clamp(0, s)
    live &= end > start
    marks = torch.zeros(h, s + 1, dtype=torch.int32, device=dev)
    marks.scatter_add_(1, torch.where(live, start, s), live.int())
    marks.scatter_add_(1, torch.where(live, end, s), -live.int())
    inside = marks.cumsum(1, dtype=torch.int32)[:, :s] > 0
    c_live = torch.arange(index.columns.shape[2], device=dev) < index.column_count[:, i, None]
    cols = torch.where(c_live, index.columns[:, i].long(), s).clamp(0, s)
    on_column = torch.zeros(h, s + 1, dtype=torch.bool, device=dev).scatter_(1, cols, True)
    return inside | on_column[:, :s]


def _first_block(index: SparseIndex, who: str) -> int:
    if index.q_offset % index.block_m:
        raise ValueError(f"{who}: expected an index whose queries start at a whole block, found q_offset "
                         f"{index.q_offset} with blocks of {index.block_m}")
    return index.q_offset // index.block_m


@dataclass
class RowSample:
    """The sampled query rows of one (prompt, layer) and their dense attention.

    probs:  ``[H, n, S]`` fp32 causal softmax of the sampled queries (``block_rows`` order).
    prefix: ``[H, n, S + 1]`` fp64 prefix sums of ``probs`` (a range's mass is two lookups).
    """

    blocks: list[int]
    rows: torch.Tensor
    probs: torch.Tensor
    prefix: torch.Tensor
    block_m: int = 64

    @classmethod
    def from_qk(cls, q: torch.Tensor, k: torch.Tensor, kv_heads: torch.Tensor, n_blocks: int = 4,
                block_m: int = 64, scale: float | None = None, tail: int = 0) -> "RowSample":
        """q: ``[S, H, D]`` every query of the prompt; k: ``[S, Hkv, D]``."""
        return cls.of_blocks(q, k, kv_heads, sample_blocks(q.shape[0], n_blocks, block_m, tail), block_m, scale)

    @classmethod
    def of_blocks(cls, q: torch.Tensor, k: torch.Tensor, kv_heads: torch.Tensor, blocks: list[int],
                  block_m: int = 64, scale: float | None = None) -> "RowSample":
        """The rows of the query blocks ``blocks`` of q ``[Tq, H, D]`` over the keys k ``[S, Hkv, D]``
        (``S`` >= the last row + 1: the probabilities are ``S`` wide)."""
        rows = block_rows(blocks, q.shape[0], block_m).to(q.device)
        probs = estimate.last_q_probs(q[rows], k, kv_heads, rows, scale)
        h, n, s = probs.shape
        prefix = torch.empty(h, n, s + 1, dtype=torch.float64, device=probs.device)
        prefix[..., 0] = 0
        for i in range(h):  # summed in fp64 one head at a time: no fp64 copy of every row
            torch.cumsum(probs[i], -1, dtype=torch.float64, out=prefix[i, :, 1:])
        return cls(blocks, rows, probs, prefix, block_m)


def kept_mass(index: SparseIndex, sample: RowSample) -> torch.Tensor:
    """``[H, n]`` the probability each sampled query keeps under ``index``, without a dense mask.

    A range ``[s, e)`` keeps ``P[min(e, p + 1)] - P[min(s, min(e, p + 1))]`` of query ``p``'s mass,
    with ``P`` its prefix sum; a column ``c <= p`` keeps ``probs[c]``. Equal to
    ``(probs * rows_mask(index, blocks)).sum(-1)`` at ``O(n (R + C))`` instead of ``O(n S)``. The
    index may cover a chunk of the prompt that holds the sampled rows.
    """
    rows, probs, prefix = sample.rows, sample.probs, sample.prefix
    n, s = rows.shape[0], probs.shape[2]
    qb = rows // index.block_m - _first_block(index, "kept_mass")
    if n and (int(qb.min()) < 0 or int(rows.max()) >= index.q_offset + index.q_len):
        raise ValueError(f"kept_mass: the sampled rows [{int(rows.min())}, {int(rows.max())}] are not all among the "
                         f"index's queries [{index.q_offset}, {index.q_offset + index.q_len})")
    p1 = (rows + 1).view(n, 1)
    r_ids = torch.arange(index.range_start.shape[2], device=rows.device)
    c_ids = torch.arange(index.columns.shape[2], device=rows.device)
    out = torch.empty(index.num_heads, n, dtype=torch.float32, device=rows.device)
    for h in range(index.num_heads):  # one head at a time: [n, R] and [n, C] transients
        e = torch.minimum(index.range_end[h, qb].long(), p1)  # [n, R]
        st = torch.minimum(index.range_start[h, qb].long(), e)
        in_ranges = ((prefix[h].gather(1, e) - prefix[h].gather(1, st)) * (r_ids < index.range_count[h, qb, None])).sum(-1)
        cols = index.columns[h, qb].long()  # [n, C]
        c_valid = (c_ids < index.column_count[h, qb, None]) & (cols < p1)
        in_cols = (probs[h].gather(1, cols.clamp(max=s - 1)).double() * c_valid).sum(-1)
        out[h] = in_ranges + in_cols
    return out


def grouped_values(v: torch.Tensor, kv_heads: torch.Tensor) -> torch.Tensor:
    """``[G, S, D]`` fp32 values, one per group of consecutive query heads that read the same KV head
    (``attend``'s right-hand side): v ``[S, Hkv, D]`` as it is when the query heads are in KV-head
    order (no copy per query head), else one copy per query head."""
    hq, hkv = kv_heads.shape[0], v.shape[1]
    if hq % hkv == 0 and torch.equal(kv_heads.cpu(), torch.arange(hq) // (hq // hkv)):
        return v.transpose(0, 1).float().contiguous()
    return v[:, kv_heads.to(v.device)].transpose(0, 1).float().contiguous()


def attend(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[H, n, D]``: the rows' probabilities ``[H, n, W]`` times ``grouped_values`` ``[G, S, D]``
    (``W <= S``: the first ``W`` keys), each group's heads in one product."""
    h, n, w = probs.shape
    g = values.shape[0]
    return torch.bmm(probs.reshape(g, h // g * n, w), values[:, :w]).view(h, n, -1)


def sample_values(sample: RowSample, v: torch.Tensor, kv_heads: torch.Tensor,
                  grouped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grouped_values, dense [H, n, D])``: the layer's values and the sampled rows' dense attention
    output, computed once per sample for every candidate's ``output_quality`` (``grouped``: the
    layer's ``grouped_values`` when the caller has them)."""
    vg = grouped_values(v, kv_heads) if grouped is None else grouped
    return vg, attend(sample.probs, vg)


def output_errors(index: SparseIndex, sample: RowSample, values: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[H, n]`` each sampled row's relative output error under ``index`` (``output_quality``)."""
    vg, dense = values
    per = sample.probs.shape[0] // vg.shape[0]
    out = []
    for g in range(vg.shape[0]):  # one group of heads at a time: its mask and masked probabilities only
        heads = slice(g * per, (g + 1) * per)
        mask = rows_mask(index.select_heads(list(range(g * per, (g + 1) * per))), sample.blocks,
                         sample.probs.shape[2])  # [per, n, S]
        kept = sample.probs[heads].masked_fill(~mask, 0.0)
        del mask
        sparse = attend(kept, vg[g : g + 1]) / kept.sum(-1, keepdim=True).clamp_min(1e-30)
        ref = dense[heads]
        out.append(((sparse - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0))
    return torch.cat(out)


def output_quality(index: SparseIndex, sample: RowSample, v: torch.Tensor, kv_heads: torch.Tensor,
                   values: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``[H]`` one minus the relative error of the sampled rows' attention *output* under ``index``.

    The sparse attention of a query is its dense softmax renormalised over the kept keys, so its
    output is ``(P * M) V / (P * M).sum()`` against the dense ``P V``; the error
    ``|o_sparse - o_dense| / |o_dense|`` (clipped to 1) is what the next layer actually receives
    wrong, where kept mass only counts probability: two patterns that drop the same mass can drop
    keys whose values differ (a sink whose value is near zero costs little to lose). v: ``[S, Hkv, D]``;
    ``values``: ``sample_values`` when the caller scores several indices on one sample.
    """
    values = values if values is not None else sample_values(sample, v, kv_heads)
    return (1.0 - output_errors(index, sample, values)).mean(-1)
