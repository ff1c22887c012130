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


def expected_density(p: Hierarchical, length: int, ctx: DensityContext = DensityContext()) -> float:
    """Each query keeps at most sink + window + the last stage's budget keys."""
    return density.density_for_keys(p.sink + p.window + ctx.block_m + p.stages[-1].budget, length)
