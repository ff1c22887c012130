"""Block-sparse attention (MInference): top-k key blocks per query block from pooled scores.

q and k are mean-pooled over ``block_m``-token blocks, pooled blocks are scored against each
other, and each query block keeps its ``top_k`` best key blocks under the causal block mask.
Unlike the reference we force the first (sink) block and the diagonal block(s): a query block
without its diagonal block would lose its own token.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from headwise.kernels import estimate
from headwise.kernels.index import SparseIndex

from . import density
from .base import DensityContext, PatternModel, PrefillInputs
from .ranges import block_bounds, make_index, merge_intervals, no_columns


class BlockSparse(PatternModel):
    type: Literal["block_sparse"] = "block_sparse"
    top_k: int = Field(100, ge=1, description="key blocks kept per query block (forced ones included)")
    force_sink: bool = Field(True, description="always keep the first key block")
    force_diagonal: bool = Field(True, description="always keep the key block(s) holding the query block")


def block_keep(p: BlockSparse, scores: torch.Tensor, bs: torch.Tensor, be: torch.Tensor, block: int) -> torch.Tensor:
    """``[H, NQB, NKB]`` kept key blocks from pooled ``scores`` of the same shape (the dense
    definition: tests and short prompts; ``build_prefill`` streams the same choice)."""
    allowed, forced = _rules(p, 0, scores.shape[-1], bs, be, block)
    keep, _ = estimate.topk_forced(scores, p.top_k, forced=forced & allowed, allowed=allowed)
    return keep


def _rules(p: BlockSparse, k0: int, k1: int, bs: torch.Tensor, be: torch.Tensor, block: int):
    """``(allowed, forced)`` ``[NQB, k1 - k0]`` for key blocks ``[k0, k1)`` of query blocks ``[bs, be)``."""
    kb = torch.arange(k0, k1, device=bs.device).view(1, -1)
    allowed = kb * block < be.view(-1, 1)  # the block starts at or before the last query
    forced = torch.zeros_like(allowed)
    if p.force_sink:
        forced |= kb == 0
    if p.force_diagonal:
        forced |= (kb >= (bs // block).view(-1, 1)) & (kb <= ((be - 1) // block).view(-1, 1))
    return allowed, forced & allowed


_MAX_FORCED = 3  # the sink block and the (at most two) key blocks a query block overlaps


def build_prefill(p: BlockSparse, inp: PrefillInputs) -> SparseIndex:
    """Top-k pooled key blocks per query block, streamed over tiles of key blocks.

    Each tile's scores are masked (disallowed -inf, forced +inf) and merged into a running
    top-``top_k + 3``; memory is one tile plus ``[H, NQB, top_k + 3]``, whatever the context.
    Forced blocks rank first, so keeping the first ``max(top_k, forced)`` of the running list is
    ``topk_forced`` over the whole row. Ranges come from the kept blocks sorted (top_k of them),
    never from an ``[H, NQB, NKB]`` mask.
    """
    if inp.q is None or inp.k is None:
        raise ValueError("block_sparse needs q and k: it scores pooled blocks")
    dev = inp.q.device
    block = inp.block_m
    h = len(inp.heads)
    bs, be = block_bounds(inp.q_offset, inp.q_len, block, dev)
    nqb, nkb = bs.shape[0], -(-inp.seq_len // block)
    width = min(nkb, p.top_k + _MAX_FORCED)
    vals = torch.full((h, nqb, 0), float("-inf"), device=dev)
    idx = torch.zeros(h, nqb, 0, dtype=torch.long, device=dev)
    n_forced = torch.zeros(nqb, dtype=torch.long, device=dev)
    for k0, tile in estimate.pooled_score_tiles(inp.q, inp.k[: inp.seq_len], inp.kv_heads, block, block, inp.scale):
        k1 = k0 + tile.shape[-1]
        allowed, forced = _rules(p, k0, k1, bs, be, block)
        n_forced += forced.sum(-1)
        tile = tile.masked_fill(~allowed, float("-inf")).masked_fill(forced, float("inf"))
        vals = torch.cat([vals, tile], -1)
        idx = torch.cat([idx, torch.arange(k0, k1, device=dev).expand(h, nqb, -1)], -1)
        vals, top = torch.topk(vals, min(width, vals.shape[-1]), dim=-1)  # sorted: forced first
        idx = torch.gather(idx, -1, top)
    rank = torch.arange(vals.shape[-1], device=dev)
    keep = (rank < torch.clamp(n_forced, min=p.top_k).view(1, -1, 1)) & (vals > float("-inf"))
    blocks = torch.sort(torch.where(keep, idx, nkb), dim=-1).values  # kept first, ascending
    live = blocks < nkb
    starts = blocks * block
    rs, re, rc = merge_intervals(starts, torch.clamp(starts + block, max=inp.seq_len), live, presorted=True)
    cols, cc = no_columns(h, nqb, dev)
    return make_index(rs, re, rc, cols, cc, inp.q_len, inp.q_offset, block, fixed=estimate.fixed_shapes(inp.q))


def expected_density(p: BlockSparse, length: int, ctx: DensityContext = DensityContext()) -> float:
    """Each query block keeps ``min(top_k, causal blocks)`` blocks; assume the causal density of those."""
    return density.block_topk_density(p.top_k, length, ctx.block_m)  # closed form
