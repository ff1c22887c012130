"""MInference's vertical-slash pattern: a few key columns plus a few diagonals, per head.

Estimation (``kernels.estimate.vertical_slash_scores``) looks at the last ``last_q`` queries of
the chunk: the probability mass of each key column gives the *vertical* score, the mass along
each diagonal (offset = query position - key position) the *slash* score. The first
``sink_columns`` columns and the ``local_diagonals`` nearest diagonals are always kept.

Index: for a query block ending at ``be``, a kept diagonal ``o`` covers the keys
``[be - o - block_m, be - o)`` (exactly the diagonal's keys for a full block, unaligned to key
blocks). Windows are merged into ranges; kept columns outside them become columns. The main
diagonal is always kept, so every key a query needs up to itself is reachable.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from headwise.kernels import estimate
from headwise.kernels.index import SparseIndex

from . import density
from .base import DensityContext, PatternModel, PrefillInputs
from .ranges import block_bounds, compact, drop_covered, make_index, merge_intervals


class VerticalSlash(PatternModel):
    type: Literal["vertical_slash"] = "vertical_slash"
    vertical: int = Field(1000, ge=0, description="key columns kept per head (sink columns included)")
    slash: int = Field(6096, ge=1, description="diagonals kept per head (local diagonals included)")
    last_q: int = Field(64, ge=1, description="probe queries at the end of the chunk used to estimate")
    sink_columns: int = Field(30, ge=0, description="first key columns always kept")
    local_diagonals: int = Field(100, ge=1, description="nearest diagonals always kept (main one included)")


_SCORE_ELEMS = 1 << 21  # (head, key) scores ranked at a time: heads are estimated in groups this big


def select(p: VerticalSlash, q: torch.Tensor, k: torch.Tensor, kv_heads: torch.Tensor, q_offset: int,
           scale: float | None = None):
    """Kept columns ``[H, V]`` ascending and kept diagonal offsets ``[H, Sd]`` *descending*, with counts.

    q: ``[Tq, H, D]``; k: ``[S, Hkv, D]``. Padding entries are large values past the counts.
    Widths are fixed by the budgets (``V = min(S, max(vertical, sink_columns))``, likewise
    ``Sd``), and the heads are estimated and ranked a group at a time, so the ``[H, S]`` scores
    are never all held: memory is ``O(S)`` per head of one group.
    """
    tq, s = q.shape[0], k.shape[0]
    h = q.shape[1]
    n_probe = min(p.last_q, tq)
    q_pos = q_offset + torch.arange(tq - n_probe, tq, device=q.device)
    pos = torch.arange(s, device=q.device)
    v_w = max(1, min(s, max(p.vertical, p.sink_columns)))
    d_w = max(1, min(s, max(p.slash, p.local_diagonals)))
    big = 2**62
    cols = torch.full((h, v_w), big, dtype=torch.long, device=q.device)
    offs = torch.full((h, d_w), big, dtype=torch.long, device=q.device)
    n_cols = torch.zeros(h, dtype=torch.long, device=q.device)
    n_diag = torch.zeros(h, dtype=torch.long, device=q.device)
    per = max(1, _SCORE_ELEMS // max(1, s))
    for h0 in range(0, h, per):
        hs = slice(h0, min(h, h0 + per))
        vert, slash = estimate.vertical_slash_scores(q[tq - n_probe:, hs], k, kv_heads[hs], q_pos, scale)  # [h, S]
        col_keep, n_cols[hs] = estimate.topk_forced(vert, p.vertical, forced=pos < p.sink_columns)
        del vert
        # every offset 0..S-1 occurs (the last probe sits at S-1), so all diagonals are candidates
        diag_keep, n_diag[hs] = estimate.topk_forced(slash, p.slash, forced=pos < p.local_diagonals)
        del slash
        cols[hs] = compact(pos.expand_as(col_keep), col_keep)[0][:, :v_w]
        offs[hs] = -compact(-pos.expand_as(diag_keep), diag_keep)[0][:, :d_w]  # ascending -o = descending o
    return cols, n_cols, offs, n_diag


_CHUNK_ITEMS = 1 << 20  # (head, block, diagonal) triples per pass: bounds memory at long lengths
_HOLD_BYTES = 64 << 20  # slices of the index kept from the sizing pass (the rest are rebuilt)


def _blocks(cols, n_cols, offs, n_diag, bs, be, block_m: int):
    """Ranges and columns of the query blocks ``[bs, be)`` (each ``[NQB']``)."""
    dev = cols.device
    d_live = (torch.arange(offs.shape[1], device=dev) < n_diag[:, None])[:, None, :]  # [H, 1, Sd]
    ends = be.view(1, -1, 1) - torch.where(d_live[:, 0], offs, 0)[:, None, :]  # [H, NQB', Sd], ascending
    starts = (ends - block_m).clamp(min=0)
    rs, re, rc = merge_intervals(starts, ends, d_live & (ends > 0), presorted=True)
    c_live = (torch.arange(cols.shape[1], device=dev) < n_cols[:, None])[:, None, :]
    cols_b = cols[:, None, :].expand(-1, bs.shape[0], -1)
    c_cols, cc = drop_covered(cols_b, c_live & (cols_b < be.view(1, -1, 1)), rs, re, rc)
    return rs.to(torch.int32), re.to(torch.int32), rc, c_cols.to(torch.int32), cc


def index_from_selection(cols, n_cols, offs, n_diag, q_len: int, q_offset: int, block_m: int,
                         fixed: bool | None = None) -> SparseIndex:
    """Turn kept columns and diagonal offsets (see ``select``) into the block index.

    fixed: keep the budget widths (no host sync; the default on CUDA) instead of trimming them.
    """
    dev = cols.device
    fixed = estimate.fixed_shapes(cols) if fixed is None else fixed
    bs, be = block_bounds(q_offset, q_len, block_m, dev)
    if not fixed:
        v_w = max(1, int(n_cols.max().item()))
        d_w = max(1, int(n_diag.max().item()))
        cols, offs = cols[:, :v_w], offs[:, :d_w]
    h, nqb = cols.shape[0], bs.shape[0]
    per = max(1, _CHUNK_ITEMS // max(1, h * max(offs.shape[1], cols.shape[1])))
    # A slice of query blocks at a time. Fixed: the index has the budget widths (at most one range
    # per diagonal, one column per kept column) and each slice is written straight into it.
    # Otherwise a first pass sizes the index to its widest row (merged bands are narrow) and keeps
    # the first slices, cut to their own widths, up to _HOLD_BYTES; the writing pass rebuilds the
    # rest, so the index is never held twice, nor at the budget widths.
    rc = torch.zeros(h, nqb, dtype=torch.long, device=dev)
    cc = torch.zeros_like(rc)
    slices = [(i, min(nqb, i + per)) for i in range(0, nqb, per)]
    kept: dict[int, tuple] = {}
    if fixed:
        r_w, c_w = offs.shape[1], cols.shape[1]
    else:
        held = 0
        for i, j in slices:
            p_rs, p_re, rc[:, i:j], p_cols, cc[:, i:j] = _blocks(cols, n_cols, offs, n_diag, bs[i:j], be[i:j], block_m)
            w_r, w_c = max(1, int(rc[:, i:j].max().item())), max(1, int(cc[:, i:j].max().item()))
            piece = (p_rs[..., :w_r].contiguous(), p_re[..., :w_r].contiguous(), p_cols[..., :w_c].contiguous())
            n = sum(t.nbytes for t in piece)
            if held + n <= _HOLD_BYTES:
                kept[i], held = piece, held + n
        r_w, c_w = max(1, int(rc.max().item())), max(1, int(cc.max().item()))
    rs = torch.zeros(h, nqb, r_w, dtype=torch.int32, device=dev)
    re, c_cols = torch.zeros_like(rs), torch.zeros(h, nqb, c_w, dtype=torch.int32, device=dev)
    for i, j in slices:
        if i in kept:
            p_rs, p_re, p_cols = kept.pop(i)
        else:
            p_rs, p_re, rc[:, i:j], p_cols, cc[:, i:j] = _blocks(cols, n_cols, offs, n_diag, bs[i:j], be[i:j],
                                                                 block_m)
        rs[:, i:j, : p_rs.shape[-1]], re[:, i:j, : p_re.shape[-1]] = p_rs[..., :r_w], p_re[..., :r_w]
        c_cols[:, i:j, : p_cols.shape[-1]] = p_cols[..., :c_w]
    return make_index(rs, re, rc, c_cols, cc, q_len, q_offset, block_m, fixed=fixed)


def build_prefill(p: VerticalSlash, inp: PrefillInputs) -> SparseIndex:
    if inp.q is None or inp.k is None:
        raise ValueError("vertical_slash needs q and k: it estimates from the last queries")
    cols, n_cols, offs, n_diag = select(p, inp.q, inp.k, inp.kv_heads, inp.q_offset, inp.scale)
    return index_from_selection(cols, n_cols, offs, n_diag, inp.q_len, inp.q_offset, inp.block_m)


def _density_for_keys(keys: float, length: int) -> float:
    """Causal density when query ``t`` keeps ``min(t + 1, keys)`` keys."""
    return density.density_for_keys(keys, length)  # closed form


def expected_density(p: VerticalSlash, length: int, ctx: DensityContext = DensityContext()) -> float:
    """Estimate assuming the kept diagonals form bands, as they do on real models.

    A band of ``n`` adjacent diagonals gives the block a key window ``n + block_m - 1`` wide, of
    which a query sees ``n`` plus its distance from the block's start: ``n + block_m / 2`` keys on
    average. So a query keeps about ``slash + block_m / 2 + vertical`` keys. (MInference's published
    densities for (1000, 6096) at 128K, 8-18%, agree with this.) ``worst_case_density`` is the
    bound when every diagonal outside the forced local band stands alone.
    """
    keys = max(p.slash, p.local_diagonals) + ctx.block_m / 2 + max(p.vertical, p.sink_columns)
    return _density_for_keys(keys, length)


def worst_case_density(p: VerticalSlash, length: int, ctx: DensityContext = DensityContext()) -> float:
    """Upper bound: each non-forced diagonal costs a whole ``block_m``-wide window per block."""
    far = max(0, p.slash - p.local_diagonals)
    keys = p.local_diagonals + ctx.block_m + far * ctx.block_m + max(p.vertical, p.sink_columns)
    return _density_for_keys(keys, length)
