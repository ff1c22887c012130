"""One layer's decode selection: group heads by spec, select per group, restore head order.

The plugin calls ``build_layer_decode_selection`` once per (layer, decode batch). TidalDecode
layers share a ``TidalState`` (the persistent buffer) for the whole model on this rank: the
``select`` layer writes it, later ``reuse`` layers read it in the same step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from headwise.kernels.index import DecodeMode, DecodeSelection

from . import families
from .base import DecodeInputs
from .tidal import TidalState


def _as_blocks_of(sel: DecodeSelection, block_size: int) -> DecodeSelection:
    """Rewrite a BLOCKS selection of larger blocks as blocks of ``block_size`` (a divisor)."""
    ratio = sel.block_size // block_size
    if ratio == 1:
        return sel
    fine = (sel.indices.long()[..., None] * ratio + torch.arange(ratio, device=sel.device)).flatten(-2)
    return DecodeSelection(sel.mode, sel.sink, sel.window, fine, sel.count * ratio, block_size)


def cat_selection_heads(parts: list[DecodeSelection], selects_blocks: list[bool]) -> DecodeSelection:
    """Stack selections of disjoint head groups along the head axis (index widths padded).

    ``selects_blocks[i]``: part ``i`` may hold BLOCKS rows (known from its pattern, so nothing is
    read back from the device). BLOCKS selections with different block sizes are rewritten in
    their greatest common block size, since a selection has one ``block_size``.
    """
    block_sizes = [p.block_size for p, b in zip(parts, selects_blocks) if b]
    bsz = math.gcd(*block_sizes) if block_sizes else parts[0].block_size
    parts = [_as_blocks_of(p, bsz) if b and p.block_size != bsz else p for p, b in zip(parts, selects_blocks)]
    width = max(p.indices.shape[2] for p in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[2]))  # noqa: E731
    return DecodeSelection(
        torch.cat([p.mode for p in parts], 1), torch.cat([p.sink for p in parts], 1),
        torch.cat([p.window for p in parts], 1), torch.cat([pad(p.indices) for p in parts], 1),
        torch.cat([p.count for p in parts], 1), bsz)


def select_heads(sel: DecodeSelection, heads: torch.Tensor) -> DecodeSelection:
    heads = heads.to(sel.device).long()
    return DecodeSelection(sel.mode[:, heads], sel.sink[:, heads], sel.window[:, heads], sel.indices[:, heads],
                           sel.count[:, heads], sel.block_size)


def build_layer_decode_selection(
    specs: list[Any],
    heads: list[int],
    num_layer_heads: int,
    q: torch.Tensor | None,
    k_cache: torch.Tensor | None,
    block_table: torch.Tensor | None,
    seq_lens: torch.Tensor,
    total_lens: torch.Tensor | None = None,
    kv_heads: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    num_layer_kv_heads: int | None = None,
    tidal_state: TidalState | None = None,
    tidal_top_k: int = 256,
    dense_below: int = 0,
    max_seq_len: int | None = None,
    page_summaries: Any = None,
    hip_state: Any = None,
    slots: torch.Tensor | None = None,
    step: int = 0,
) -> DecodeSelection:
    """The ``DecodeSelection`` ``[B, H_local]`` (query-head axis) of one layer for one decode batch.

    specs:       decode spec per local query head (``plan.decode(layer, heads[i])``).
    heads:       global query-head id per local head; the TidalState's head axis is the *local* one.
    q:           ``[B, H, D]`` new-token queries of the local heads (None if no spec needs it).
    k_cache:     ``[num_blocks, Hkv, block_size, D]`` paged keys (strided view is fine).
    block_table: ``[B, max_blocks]`` int32; seq_lens ``[B]`` int32 (current token included).
    total_lens:  ``[B]`` prompt + planned generation (MoA); defaults to seq_lens.
    kv_heads:    ``[H]`` long, local KV head per local head (indexes k_cache's head axis).
    dense_below: requests shorter than this read every token (their row becomes DENSE).
    max_seq_len: host bound on seq_lens (the engine's max model length): selections are padded to
                 it, so nothing reads seq_lens back (capturable decode step).
    page_summaries: this layer's ``PageSummaries`` (Quest min/max kept by ``update_page_summaries``);
                 None: page_topk recomputes them from k_cache.
    hip_state, slots, step: HiP decode's ``HipDecodeState`` for this layer, each request's row in
                 it ``[B]`` and the decode step counter that decides which stages refresh; without
                 a state HiP runs every stage each step.
    """
    if len(specs) != len(heads):
        raise ValueError(f"build_layer_decode_selection: {len(specs)} specs for {len(heads)} heads")
    n, b, dev = len(heads), int(seq_lens.shape[0]), seq_lens.device
    if all(s.type == "dense" for s in specs):
        return DecodeSelection.uniform(b, n, DecodeMode.DENSE, device=dev)
    if kv_heads is None:
        group = num_layer_heads // (num_layer_kv_heads or num_layer_heads)
        kv_heads = torch.tensor([h // group for h in heads], dtype=torch.long)
    kv_heads = kv_heads.long()
    total_lens = seq_lens if total_lens is None else total_lens
    scale = (1.0 / math.sqrt(q.shape[-1]) if q is not None else 1.0) if scale is None else scale

    groups: dict[Any, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(spec, []).append(i)
    parts, order = [], []
    for spec, local in groups.items():
        idx = torch.tensor(local, dtype=torch.long)
        inp = DecodeInputs(
            heads=[heads[i] for i in local], num_layer_heads=num_layer_heads, seq_lens=seq_lens,
            total_lens=total_lens, q=None if q is None else q[:, idx.to(q.device)], k_cache=k_cache,
            block_table=block_table, kv_heads=kv_heads[idx.to(kv_heads.device)], scale=scale,
            num_layer_kv_heads=num_layer_kv_heads, max_seq_len=max_seq_len, page_summaries=page_summaries,
            hip_state=hip_state, slots=slots, step=step)
        module = families.DECODE[spec.type]
        if spec.type == "hierarchical":
            sel = module.select_decode(spec, inp, idx)
        elif spec.type == "tidal":
            sel = module.select_decode(spec, inp, tidal_state, idx, tidal_top_k)
        else:
            sel = module.select_decode(spec, inp)
        parts.append(sel.to(dev) if sel.device != dev else sel)
        order.extend(local)
    sel = parts[0] if len(parts) == 1 else \
        cat_selection_heads(parts, [spec.type in families.DECODE_BLOCKS for spec in groups])
    if len(parts) > 1:
        inverse = torch.empty(n, dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(n)
        sel = select_heads(sel, inverse)
    if dense_below > 0:
        short = (seq_lens.to(dev) < dense_below).view(-1, 1)
        sel.mode = torch.where(short, torch.full_like(sel.mode, int(DecodeMode.DENSE)), sel.mode)
    return sel
