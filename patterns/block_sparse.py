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

from .base import DensityContext, PatternModel, PrefillInputs
from .ranges import block_bounds, make_index, no_columns, ranges_from_mask


class BlockSparse(PatternModel):
    type: Literal["block_sparse"] = "block_sparse"
    top_k: int = Field(100, ge=1, description="key blocks kept per query block (forced ones included)")
    force_sink: bool = Field(True, description="always keep the first key block")
    force_diagonal: bool = Field(True, description="always keep the key block(s) holding the query block")


def block_keep(p: BlockSparse, scores: torch.Tensor, bs: torch.Tensor, be: torch.Tensor, block: int) -> torch.Tensor:
    """``[H, NQB, NKB]`` kept key blocks from pooled ``scores`` of the same shape."""
    kb = torch.arange(scores.shape[-1], device=scores.device).view(1, -1)
    allowed = kb * block < be.view(-1, 1)  # the block starts at or before the last query
    forced = torch.zeros_like(allowed)
    if p.force_sink:
        forced |= kb == 0
    if p.force_diagonal:
        forced |= (kb >= (bs // block).view(-1, 1)) & (kb <= ((be - 1) // block).view(-1, 1))
    keep, _ = estimate.topk_forced(scores, p.top_k, forced=forced & allowed, allowed=allowed)
    return keep


def build_prefill(p: BlockSparse, inp: PrefillInputs) -> SparseIndex:
    if inp.q is None or inp.k is None:
        raise ValueError("block_sparse needs q and k: it scores pooled blocks")
    dev = inp.q.device
    block = inp.block_m
    bs, be = block_bounds(inp.q_offset, inp.q_len, block, dev)
    scores = estimate.pooled_block_scores(inp.q, inp.k[: inp.seq_len], inp.kv_heads, block, block, inp.scale)
    keep = block_keep(p, scores, bs, be, block)
    rs, re, rc = ranges_from_mask(keep, block, inp.seq_len)
    cols, cc = no_columns(len(inp.heads), bs.shape[0], dev)
    return make_index(rs, re, rc, cols, cc, inp.q_len, inp.q_offset, block)


def expected_density(p: BlockSparse, length: int, ctx: DensityContext = DensityContext()) -> float:
    """Each query block keeps ``min(top_k, causal blocks)`` blocks; assume the causal density of those."""
    b = ctx.block_m
    nqb = -(-length // b)
    if nqb == 0:
        return 0.0
    qb = torch.arange(nqb, dtype=torch.float64)
    causal_blocks = qb + 1
    kept_frac = torch.minimum(torch.full_like(qb, float(p.top_k)), causal_blocks) / causal_blocks
    # weight each block by its causal pairs (the diagonal block is half full)
    pairs = b * b * qb + b * (b + 1) / 2
    return float((kept_frac * pairs).sum() / pairs.sum())
