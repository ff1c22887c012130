"""HiP decode: the hierarchical top-k over the cached keys, refreshed every few steps.

A decode step is a one-query chunk: the candidate region is ``[sink, len - window)`` and the
stages of ``hierarchical.select_units`` run over it with the new token's query, reading the
representative keys straight from the paged cache. Stage ``i`` re-runs only every
``refresh[i]`` steps (from the previous stage's cached output); in between, its last output is
reused from ``HipDecodeState``, a persistent buffer per layer. When a stage re-runs, every finer
stage re-runs too. A new request (``HipDecodeState.reset``) gets a full run.

The selection is POSITIONS: the sink, the selected units' tokens clipped to the region (the
window moves on between refreshes), then the window. Width ``sink + last budget + window``,
fixed by the spec, so the step needs no host sync when ``max_seq_len`` is given.
"""

from __future__ import annotations

import torch

from headwise.kernels.index import DecodeMode, DecodeSelection

from .base import DecodeInputs, DensityContext
from .hierarchical import Hierarchical, descend, split_units


class HipDecodeState:
    """Each stage's kept unit starts per (request slot, local head), for one layer.

    units[i]:  ``[max_slots, num_heads, budget_i / chunk_i]`` long; counts[i]: ``[max_slots, num_heads]``.
    Slots are rows the engine keeps per running request (the same slot every step).
    """

    def __init__(self, spec: Hierarchical, max_slots: int, num_heads: int, device: torch.device | str = "cpu"):
        self.units = [torch.zeros(max_slots, num_heads, s.budget // s.chunk, dtype=torch.long, device=device)
                      for s in spec.stages]
        self.counts = [torch.zeros(max_slots, num_heads, dtype=torch.long, device=device) for _ in spec.stages]
        self.fresh = True  # host flag: a request joined since the last step (full run)

    def reset(self, slots: list[int] | None = None) -> None:
        """A new request took ``slots``: the next step runs every stage."""
        self.fresh = True

    def step_done(self) -> None:
        """Call after every layer of a decode step has selected."""
        self.fresh = False


def first_stage_to_run(p: Hierarchical, step: int, state: HipDecodeState | None) -> int:
    """Stages from this one on re-run at ``step``; ``len(stages)`` means all are reused."""
    if state is None or state.fresh:
        return 0
    for i, r in enumerate(p.refresh):
        if step % r == 0:
            return i
    return len(p.stages)


def _paged_scores(q, k_cache, block_table, kv_heads, scale):
    """``score(rep [B, H, M]) -> [B, H, M]``: ``q . k`` of the listed positions, read from the cache."""
    b, h, d = q.shape
    bsz = k_cache.shape[2]
    qf = q.float() * scale
    kvh = kv_heads.to(k_cache.device).long().view(1, h, 1)

    def score(rep: torch.Tensor) -> torch.Tensor:
        blk = torch.gather(block_table.long(), 1, (rep // bsz).view(b, -1).clamp(max=block_table.shape[1] - 1))
        keys = k_cache[blk.view(rep.shape), kvh, rep % bsz].float()  # [B, H, M, D]
        return torch.einsum("bhd,bhmd->bhm", qf, keys)

    return score


def select_decode(p: Hierarchical, inp: DecodeInputs, local_heads: torch.Tensor) -> DecodeSelection:
    if inp.q is None or inp.k_cache is None:
        raise ValueError("hierarchical decode needs q and the paged k_cache")
    q, dev = inp.q, inp.q.device
    b, h = q.shape[0], q.shape[1]
    state: HipDecodeState | None = inp.hip_state
    lens = inp.seq_lens.to(dev).long().view(b, 1, 1)
    max_len = inp.max_seq_len if inp.max_seq_len is not None else (int(inp.seq_lens.max().item()) if b else 1)
    lo = p.sink
    limit = torch.clamp(lens - p.window, min=lo)  # [B, 1, 1]: the region [sink, len - window)
    max_limit = max(lo, max_len - p.window)
    score = _paged_scores(q, inp.k_cache, inp.block_table, inp.kv_heads, inp.scale)
    slots = (inp.slots if inp.slots is not None else torch.arange(b)).to(dev).long()
    heads = local_heads.to(dev).long()
    start = first_stage_to_run(p, inp.step, state)
    lim = limit.expand(b, h, 1)
    c0 = p.stages[0].chunk
    if start == 0:
        cand_n = (((lim - lo).clamp(min=0) + c0 - 1) // c0)[..., 0]
        max_cand = max(1, -(-(max_limit - lo) // c0))
        unit_at = lambda i: lo + i * c0  # noqa: E731
        cand, chunk = None, c0
    else:  # the previous stage's cached output
        prev = p.stages[start - 1]
        cand = state.units[start - 1][slots[:, None], heads[None, :]]
        cand_n = state.counts[start - 1][slots[:, None], heads[None, :]]
        chunk = prev.chunk
    for i in range(start, len(p.stages)):
        stage = p.stages[i]
        if i > 0:
            cand, cand_n = split_units(cand, cand_n, chunk, stage.chunk, lim)
            max_cand, chunk = cand.shape[-1], stage.chunk
            unit_at = lambda j, c=cand: torch.gather(c, -1, j.clamp(max=c.shape[-1] - 1))  # noqa: E731
        cand, cand_n = descend(score, unit_at, cand_n, max(1, max_cand), chunk, stage.budget // chunk, lim)
        if state is not None:
            state.units[i][slots[:, None], heads[None, :]] = cand
            state.counts[i][slots[:, None], heads[None, :]] = cand_n
    if start == len(p.stages):
        cand = state.units[-1][slots[:, None], heads[None, :]]
        cand_n = state.counts[-1][slots[:, None], heads[None, :]]
    return _positions(p, cand, cand_n, p.stages[-1].chunk, lens, b, h, dev)


def _positions(p: Hierarchical, units, count, chunk: int, lens, b: int, h: int, dev) -> DecodeSelection:
    """Sink, unit tokens below the window, window: sorted, disjoint, in one padded list."""
    s_end = torch.clamp(lens, max=p.sink).view(b, 1)  # [B, 1]
    w0 = torch.maximum(lens.view(b, 1) - p.window, s_end)  # window start
    u = units.shape[-1]
    tok = (units[..., None] + torch.arange(chunk, device=dev)).flatten(-2)  # [B, H, U * chunk] ascending
    ok = (torch.arange(u * chunk, device=dev) // chunk < count[..., None]) & (tok < w0[..., None])
    nt = ok.sum(-1)  # valid tokens form a prefix (both conditions are prefixes of a sorted list)
    width = p.sink + u * chunk + p.window
    j = torch.arange(width, device=dev).view(1, 1, -1)
    s_end3, w0_3 = s_end.view(b, 1, 1), w0.view(b, 1, 1)
    mid = torch.gather(tok, -1, (j - s_end3).clamp(0, u * chunk - 1).expand(b, h, -1))
    after = j - s_end3 - nt[..., None]  # index into the window
    pos = torch.where(j < s_end3, j, torch.where(after < 0, mid, w0_3 + after))
    n = s_end + nt + (lens.view(b, 1) - w0)
    pos = torch.where(j < n[..., None], pos, 0)
    return DecodeSelection.uniform(b, h, DecodeMode.POSITIONS, indices=pos, count=n, device=dev)


def expected_decode_density(p: Hierarchical, length: int, ctx: DensityContext = DensityContext()) -> float:
    return min(1.0, (p.sink + p.window + p.stages[-1].budget) / max(1, length))
