"""HiP (hierarchical attention pruning): dynamic top-k keys by greedy tree descent.

Written from the paper's description. Keys outside an always-kept sink and local window are
candidates. Each *stage* keeps a budget of ``chunk``-token units among its candidates: the
candidates are split evenly into ``budget / chunk`` groups; every group is halved, each half is
scored by one representative key (its middle unit's middle token; the score is the best
``q . k`` over the query block's queries), and the best half of all ``2n`` halves are kept.
After ``log2(group size)`` rounds every group is one unit. The next stage splits the kept units
into its own smaller units and does the same with its smaller budget.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from headwise.kernels import estimate
from headwise.kernels.index import SparseIndex

from . import density
from .base import DensityContext, PatternModel, PrefillInputs
from .plan_errors import invalid
from .ranges import block_bounds, compact, make_index, merge_intervals, no_columns


class HipStage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    chunk: int = Field(ge=1, description="tokens per unit this stage selects")
    budget: int = Field(ge=1, description="tokens this stage keeps (a multiple of chunk)")


_DEFAULT_STAGES = (HipStage(chunk=256, budget=32768), HipStage(chunk=32, budget=8192), HipStage(chunk=8, budget=2048))


class Hierarchical(PatternModel):
    type: Literal["hierarchical"] = "hierarchical"
    sink: int = Field(256, ge=0, description="first tokens always attended")
    window: int = Field(1024, ge=1, description="most recent tokens always attended")
    stages: tuple[HipStage, ...] = Field(_DEFAULT_STAGES, min_length=1, description="coarse to fine")
    refresh: tuple[int, ...] = Field((32, 16, 8), description="decode steps between re-running each stage "
                                     "(for a HiP decode selector; prefill ignores it)")

    @model_validator(mode="after")
    def _stages_nest(self) -> "Hierarchical":
        chunks = [s.chunk for s in self.stages]
        budgets = [s.budget for s in self.stages]
        for a, b in zip(chunks, chunks[1:]):
            if b >= a or a % b:
                raise invalid("stage chunk sizes that shrink and divide the previous one", str(chunks))
        for s in self.stages:
            if s.budget % s.chunk:
                raise invalid("every stage budget a multiple of its chunk", f"budget {s.budget} with chunk {s.chunk}")
        if any(b > a for a, b in zip(budgets, budgets[1:])):
            raise invalid("stage budgets that do not grow", str(budgets))
        if len(self.refresh) != len(self.stages) or any(r < 1 for r in self.refresh):
            raise invalid(f"one positive refresh interval per stage ({len(self.stages)})", str(list(self.refresh)))
        return self


def rounds_for(max_group: int) -> int:
    """Halving rounds until a group of ``max_group`` units is one unit (extra rounds are no-ops)."""
    r = 0
    while max_group > 1:
        max_group = (max_group + 1) // 2
        r += 1
    return r


def descend(score, unit_at, cand_n: torch.Tensor, max_cand: int, chunk: int, keep_n: int, limit: torch.Tensor):
    """One stage: keep ``keep_n`` of each row's ``cand_n`` candidate units by greedy halving.

    unit_at(i): the start positions of candidate units ``i`` (``[*rows, M]`` long, valid below
    ``cand_n``, ascending); stage 1 passes arithmetic units, so its candidates are never stored.
    score(positions ``[*rows, M]``): fp32 scores of representative keys.
    max_cand: a host bound on ``cand_n`` that fixes the number of rounds (no host sync).
    Units are ``chunk`` tokens clipped at ``limit`` (broadcastable to rows: the candidate
    region's end). Returns the kept unit starts ``[*rows, keep_n]`` (ascending, padded) and counts.
    """
    dev = cand_n.device
    n = keep_n
    i = torch.arange(n + 1, device=dev)
    # n groups partition [0, cand_n) evenly (rows with cand_n <= n get groups of size 0 or 1)
    bounds = (cand_n[..., None] * i) // n  # [*rows, n + 1]
    gs, ge = bounds[..., :-1], bounds[..., 1:]
    for _ in range(rounds_for(-(-max_cand // n))):
        mid = (gs + ge + 1) // 2  # a size-1 group keeps itself as the left half, right half empty
        hs = torch.cat([gs, mid], -1)
        he = torch.cat([mid, ge], -1)
        live = he > hs
        rep_unit = unit_at(torch.clamp((hs + he - 1) // 2, min=0))
        rep = torch.minimum(rep_unit + chunk // 2, limit - 1).clamp(min=0)
        top = torch.topk(score(rep).masked_fill(~live, float("-inf")), n, dim=-1).indices
        gs, ge = torch.gather(hs, -1, top), torch.gather(he, -1, top)
    live = ge > gs
    return compact(unit_at(gs), live)


def split_units(cand: torch.Tensor, cand_n: torch.Tensor, chunk: int, sub: int, limit: torch.Tensor):
    """Every kept unit of ``chunk`` tokens as units of ``sub`` tokens, those below ``limit``.

    cand ``[*rows, M]`` ascending below ``cand_n``: the split list is ascending too and its valid
    items form a prefix (both conditions are prefixes of a sorted list), so no sort is needed.
    """
    ratio = chunk // sub
    units = (cand[..., :, None] + torch.arange(ratio, device=cand.device) * sub).flatten(-2)  # [*rows, M * ratio]
    ok = (torch.arange(units.shape[-1], device=cand.device) // ratio < cand_n[..., None]) & (units < limit)
    return units, ok.sum(-1)


def select_units(p: Hierarchical, score, lo: int, limit: torch.Tensor, max_limit: int, rows: tuple):
    """All stages for rows whose candidate region is ``[lo, limit)``; ``max_limit`` bounds ``limit``
    on the host. Returns the last stage's unit starts ``[*rows, keep]``, counts, and its chunk."""
    c0 = p.stages[0].chunk
    lim = limit.expand(*rows, 1)
    cand_n = (((lim - lo).clamp(min=0) + c0 - 1) // c0)[..., 0]
    max_cand = max(0, -(-(max_limit - lo) // c0))
    unit_at = lambda i: lo + i * c0  # noqa: E731  stage 1: aligned units from the sink, never stored
    chunk = c0
    cand = None
    for i, stage in enumerate(p.stages):
        if i > 0:
            cand, cand_n = split_units(cand, cand_n, chunk, stage.chunk, lim)
            max_cand = cand.shape[-1]
            chunk = stage.chunk
            unit_at = lambda j, c=cand: torch.gather(c, -1, j.clamp(max=c.shape[-1] - 1))  # noqa: E731
        cand, cand_n = descend(score, unit_at, cand_n, max(1, max_cand), chunk, stage.budget // chunk, lim)
    return cand, cand_n, chunk


def build_prefill(p: Hierarchical, inp: PrefillInputs) -> SparseIndex:
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
    last_bs = inp.q_offset + (nqb - 1) * inp.block_m  # host copy of the largest limit
    max_limit = max(lo, last_bs - p.window + 1)
    score = lambda rep: estimate.block_max_scores(q, k, inp.kv_heads, rep, inp.block_m, inp.scale)  # noqa: E731
    cand, cand_n, chunk = select_units(p, score, lo, limit, max_limit, (h, nqb))
    live = torch.arange(cand.shape[-1], device=dev) < cand_n[..., None]
    sel_s, sel_e = cand, torch.minimum(cand + chunk, limit)
    sink_s = torch.zeros(h, nqb, 1, dtype=torch.long, device=dev)
    sink_e = torch.full_like(sink_s, lo).minimum(be.view(1, -1, 1))
    win_s, win_e = win_start.view(1, -1, 1).expand(h, nqb, 1), be.view(1, -1, 1).expand(h, nqb, 1)
    # sink, then the units (ascending, inside [lo, limit)), then the window: already in order
    starts = torch.cat([sink_s, sel_s, win_s], -1)
    ends = torch.cat([sink_e, sel_e, win_e], -1)
    valid = torch.cat([torch.ones(h, nqb, 1, dtype=torch.bool, device=dev), live,
                       torch.ones(h, nqb, 1, dtype=torch.bool, device=dev)], -1)
    rs, re, rc = merge_intervals(starts, ends, valid, presorted=True)
    cols, cc = no_columns(h, nqb, dev)
    return make_index(rs, re, rc, cols, cc, inp.q_len, inp.q_offset, inp.block_m, fixed=estimate.fixed_shapes(q))


def expected_density(p: Hierarchical, length: int, ctx: DensityContext = DensityContext()) -> float:
    """Each query keeps at most sink + window + the last stage's budget keys."""
    return density.density_for_keys(p.sink + p.window + ctx.block_m + p.stages[-1].budget, length)
