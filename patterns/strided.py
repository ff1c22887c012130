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

from headwise.kernels import estimate
from headwise.kernels.index import DecodeMode, DecodeSelection, SparseIndex

from . import density
from .base import DecodeInputs, DensityContext, PatternModel, PrefillInputs
from .ranges import block_bounds, make_index, no_columns


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
    """``[H, N, nkb]`` kept key blocks for rows whose newest key block is ``last_block`` ``[N]``
    (the definition, for tests; the builders below use its closed form)."""
    kb = torch.arange(nkb, device=last_block.device).view(1, 1, -1)
    last = last_block.view(1, -1, 1)
    shift = shift.to(last_block.device).view(-1, 1, 1)
    causal = kb <= last
    local = kb > last - p.local_blocks
    shard = (kb + shift) % p.vert_stride == 0
    return causal & (local | shard)


def shard_blocks(p: Strided, shift: torch.Tensor, last_block: torch.Tensor, nkb: int):
    """The kept blocks of ``block_mask`` without the mask: shard blocks, then the local run.

    shift: ``[H]``; last_block: ``[N]``. Returns ``first [H, 1]`` (the first shard block),
    ``n_shard [H, N]`` (shard blocks before the local run), ``local0 [1, N]`` (first local block)
    and ``width`` (a bound on ``n_shard`` fixed by ``nkb``: no host sync). Shard block ``j`` is
    ``first + j * vert_stride``.
    """
    stride = p.vert_stride
    last = last_block.long().view(1, -1)
    local0 = torch.clamp(last - p.local_blocks + 1, min=0)
    first = ((-shift.to(last.device).long()) % stride).view(-1, 1)
    n_shard = torch.clamp((local0 - first + stride - 1) // stride, min=0)
    if stride == 1:  # every block is kept: one run from 0
        n_shard = torch.zeros_like(n_shard)
        local0 = torch.zeros_like(local0)
    width = 0 if stride == 1 else -(-nkb // stride)
    return first, n_shard, local0, width


def build_prefill(p: Strided, inp: PrefillInputs) -> SparseIndex:
    """Ranges in closed form: one per shard block, then the local run (the last shard block
    merges into it when they touch). ``O(H * NQB * NKB / vert_stride)``, no mask, no sort."""
    device = inp.q.device if inp.q is not None else "cpu"
    bs, be = block_bounds(inp.q_offset, inp.q_len, inp.block_m, device)
    nkb = -(-inp.seq_len // p.block_size)
    shift = _shift(p, inp.global_kv_heads(), inp.num_layer_kv_heads or inp.num_layer_heads)
    last = (be - 1) // p.block_size
    first, n_shard, local0, width = shard_blocks(p, shift, last, nkb)  # [H, 1], [H, NQB], [1, NQB]
    h, nqb = shift.shape[0], bs.shape[0]
    n = n_shard.view(h, nqb, 1)
    local_s = (local0 * p.block_size).view(1, nqb, 1)
    local_e = torch.clamp((last + 1) * p.block_size, max=inp.seq_len).view(1, nqb, 1)
    touches = (n > 0) & (first.view(h, 1, 1) + (n - 1) * p.vert_stride + 1 == local0.view(1, nqb, 1))
    rc = (n + (~touches).long()).view(h, nqb)  # the local run is its own range unless merged
    # the [H, NQB, J] tensors (J ~ context / (block_size * vert_stride)) are built in the index's
    # int32 and filled in place: at 1M tokens each is 32 MiB for Llama-3.1-8B geometry
    i32 = torch.int32
    j = torch.arange(width + 1, device=device, dtype=i32).view(1, 1, -1)
    n32 = n.to(i32)
    shard = j < n32
    live = j < rc.view(h, nqb, 1).to(i32)
    start = (first.view(h, 1, 1).to(i32) + j * p.vert_stride) * p.block_size  # [H, 1, J]
    rs = torch.where(shard, start, local_s.to(i32)).masked_fill_(~live, 0)
    re = torch.where(shard, start + p.block_size, local_e.to(i32))
    re = torch.where(touches & (j == n32 - 1), local_e.to(i32), re).masked_fill_(~live, 0)
    cols, cc = no_columns(h, nqb, device)
    return make_index(rs, re, rc, cols, cc, inp.q_len, inp.q_offset, inp.block_m, fixed=estimate.fixed_shapes(inp.q))


def select_decode(p: Strided, inp: DecodeInputs) -> DecodeSelection:
    """Blocks in closed form: the shard blocks, then the local run. The width is fixed by
    ``inp.max_seq_len`` when the caller gives it (no host sync), else by the longest request."""
    dev = inp.seq_lens.device
    lens = inp.seq_lens.long()
    b, h = lens.shape[0], len(inp.heads)
    max_len = inp.max_seq_len if inp.max_seq_len is not None else (int(lens.max().item()) if b else 1)
    nkb = max(1, -(-max_len // p.block_size))
    shift = _shift(p, inp.global_kv_heads(), inp.num_layer_kv_heads or inp.num_layer_heads)
    last = (lens - 1).clamp(min=0) // p.block_size
    first, n_shard, local0, width = shard_blocks(p, shift, last, nkb)  # [H, 1], [H, B], [1, B]
    n = n_shard.transpose(0, 1)  # [B, H]
    n_local = (last.view(-1, 1) - local0.view(-1, 1) + 1)  # [B, 1]
    count = n + n_local
    run = nkb if p.vert_stride == 1 else min(p.local_blocks, nkb)  # longest local run
    j = torch.arange(width + run, device=dev).view(1, 1, -1)
    shard = first.view(1, h, 1) + j * p.vert_stride
    local = local0.view(-1, 1, 1) + (j - n[..., None])
    idx = torch.where(j < n[..., None], shard, local)
    idx = torch.where(j < count[..., None], idx, 0)
    return DecodeSelection.uniform(b, h, DecodeMode.BLOCKS, indices=idx, count=count, block_size=p.block_size,
                                   device=dev)


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
