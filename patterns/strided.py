"""S2-Attention strided shards: local blocks + every ``vert_stride``-th block, shifted per head.

Key blocks are ``block_size`` tokens. A head keeps its ``local_blocks`` most recent key blocks
(the diagonal one included) and every earlier block ``kb`` with
``(kb + g * step + offset) % vert_stride == 0``, where ``g`` is the head's *global KV head* and
``step = max(1, vert_stride // num_kv_heads)``: the KV heads of a layer take different shards,
so together they cover the whole context. Defining it per KV head keeps a GQA group on one
shard (the group reads the same K/V blocks).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from headwise.kernels.index import DecodeMode, DecodeSelection, SparseIndex

from . import density
from .base import DecodeInputs, DensityContext, PatternModel, PrefillInputs
from .ranges import block_bounds, compact, make_index, no_columns, ranges_from_mask


class Strided(PatternModel):
    type: Literal["strided"] = "strided"
    local_blocks: int = Field(16, ge=1, description="most recent key blocks always kept")
    vert_stride: int = Field(8, ge=1, description="keep one block in every vert_stride")
    offset: int = Field(0, ge=0, description="shifts which blocks the stride lands on")
    block_size: int = Field(64, ge=16, multiple_of=16, description="tokens per key block")


def _shift(p: Strided, kv_heads: list[int], num_kv_heads: int) -> torch.Tensor:
    """``[H]`` the per-head shift ``g * step + offset`` of the stride condition."""
    step = max(1, p.vert_stride // max(1, num_kv_heads))
    return torch.tensor([g * step + p.offset for g in kv_heads], dtype=torch.long)


def block_mask(p: Strided, shift: torch.Tensor, last_block: torch.Tensor, nkb: int) -> torch.Tensor:
    """``[H, N, nkb]`` kept key blocks for rows whose newest key block is ``last_block`` ``[N]``."""
    kb = torch.arange(nkb, device=last_block.device).view(1, 1, -1)
    last = last_block.view(1, -1, 1)
    shift = shift.to(last_block.device).view(-1, 1, 1)
    causal = kb <= last
    local = kb > last - p.local_blocks
    shard = (kb + shift) % p.vert_stride == 0
    return causal & (local | shard)


def build_prefill(p: Strided, inp: PrefillInputs) -> SparseIndex:
    device = inp.q.device if inp.q is not None else "cpu"
    bs, be = block_bounds(inp.q_offset, inp.q_len, inp.block_m, device)
    nkb = -(-inp.seq_len // p.block_size)
    shift = _shift(p, inp.global_kv_heads(), inp.num_layer_kv_heads or inp.num_layer_heads)
    mask = block_mask(p, shift, (be - 1) // p.block_size, nkb)  # [H, NQB, NKB]
    rs, re, rc = ranges_from_mask(mask, p.block_size, inp.seq_len)
    cols, cc = no_columns(len(inp.heads), bs.shape[0], device)
    return make_index(rs, re, rc, cols, cc, inp.q_len, inp.q_offset, inp.block_m)


def select_decode(p: Strided, inp: DecodeInputs) -> DecodeSelection:
    dev = inp.seq_lens.device
    lens = inp.seq_lens.long()
    nkb = max(1, -(-int(lens.max().item()) // p.block_size)) if lens.numel() else 1
    shift = _shift(p, inp.global_kv_heads(), inp.num_layer_kv_heads or inp.num_layer_heads)
    mask = block_mask(p, shift, (lens - 1) // p.block_size, nkb).transpose(0, 1)  # [B, H, NKB]
    idx, count = compact(torch.arange(nkb, device=dev).expand(mask.shape), mask)
    width = max(1, int(count.max().item()))
    idx = torch.where(torch.arange(width, device=dev) < count[..., None], idx[..., :width], 0)
    b, h = mask.shape[:2]
    sel = DecodeSelection.uniform(b, h, DecodeMode.BLOCKS, indices=idx, count=count, block_size=p.block_size,
                                  device=dev)
    return sel


def expected_density(p: Strided, length: int, ctx: DensityContext = DensityContext()) -> float:
    """Averaged over every head of the layer: the shards differ per KV head."""
    heads = list(range(ctx.num_layer_heads))
    inp = PrefillInputs(heads=heads, num_layer_heads=ctx.num_layer_heads, q_offset=0, q_len=1,
                        total_len=1, block_m=ctx.block_m, num_layer_kv_heads=ctx.num_layer_kv_heads)
    shifts = _shift(p, inp.global_kv_heads(), ctx.num_layer_kv_heads or ctx.num_layer_heads).tolist()
    return density.strided_density(p.local_blocks, p.vert_stride, p.block_size, shifts, length, ctx.block_m)


def expected_decode_density(p: Strided, length: int, ctx: DensityContext = DensityContext()) -> float:
    nkb = -(-length // p.block_size)
    kept = min(nkb, p.local_blocks) + max(0, nkb - p.local_blocks) / p.vert_stride
    return min(1.0, kept * p.block_size / max(1, length))
