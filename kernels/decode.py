"""Paged sparse decode attention over a ``DecodeSelection``: the torch path (CPU, test oracle).

Each (request, selection head) becomes one row with a padded list of the cached positions it
reads (DENSE: all; WINDOW: sink + recent window; POSITIONS: the listed tokens; BLOCKS: every token
of the listed logical blocks), built with tensor arithmetic for the whole batch at once. When the
selection has one entry per KV head, the row carries the whole GQA group's queries, so each
selected K/V row is gathered once per group. K/V are read from the paged cache through the block
table; nothing else is copied.

The Triton kernel (``decode_triton.py``) implements the same contract; ``sparse_decode`` (in
``dispatch.py``) chooses between them.
"""

from __future__ import annotations

import math

import torch

from .attention_torch import KEY_SLOT_BUDGET, attend, chunks
from .index import DecodeMode, DecodeSelection


def selected_counts(selection: DecodeSelection, seq_lens: torch.Tensor) -> torch.Tensor:
    """``[B, H]`` long: an upper bound of the tokens each (request, head) reads (exact except for
    listed positions/blocks past the sequence end, which are masked later)."""
    length = seq_lens.long().view(-1, 1)
    sink = torch.minimum(selection.sink.long().clamp(min=0), length)
    window = torch.minimum(selection.window.long().clamp(min=0), length - sink)
    count = selection.count.long()
    mode = selection.mode.long()
    return torch.where(
        mode == DecodeMode.DENSE, length.expand_as(mode),
        torch.where(mode == DecodeMode.WINDOW, sink + window,
                    torch.where(mode == DecodeMode.POSITIONS, count, count * selection.block_size)),
    )


def selection_positions(
    selection: DecodeSelection, seq_lens: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded positions each (request, head) reads: pos, valid ``[B, H, width]``."""
    dev = selection.device
    length = seq_lens.long().to(dev).view(-1, 1, 1)
    j = torch.arange(width, device=dev).view(1, 1, -1)
    mode = selection.mode.long()[..., None]
    # WINDOW: slots [0, sink) are the sink, the rest walk the window [len - window, len)
    sink = torch.minimum(selection.sink.long()[..., None].clamp(min=0), length)
    w_start = torch.maximum(length - selection.window.long()[..., None], sink)
    win_pos = torch.where(j < sink, j, w_start + (j - sink))
    # POSITIONS / BLOCKS: read the padded index list (clamped so padding slots stay in bounds)
    kmax = selection.indices.shape[2]
    count = selection.count.long()[..., None]
    idx = selection.indices.long()
    bs = selection.block_size
    listed = torch.gather(idx, 2, j.clamp(max=kmax - 1).expand(*idx.shape[:2], width))
    blk_slot = (j // bs).clamp(max=kmax - 1).expand(*idx.shape[:2], width)
    blocks = torch.gather(idx, 2, blk_slot) * bs + j % bs
    pos = torch.where(
        mode == DecodeMode.DENSE, j,
        torch.where(mode == DecodeMode.WINDOW, win_pos,
                    torch.where(mode == DecodeMode.POSITIONS, listed, blocks)),
    )
    in_list = torch.where(
        mode == DecodeMode.POSITIONS, j < count,
        torch.where(mode == DecodeMode.BLOCKS, (j // bs) < count, torch.ones_like(j, dtype=torch.bool)),
    )
    valid = in_list & (pos >= 0) & (pos < length)
    return torch.where(valid, pos, 0), valid


def shared_by_group(selection: DecodeSelection, hkv: int) -> DecodeSelection:
    """The same selection on the KV-head axis when every GQA group's query heads carry identical
    entries (dense, window and most static layers), else ``selection`` unchanged: a shared row
    gathers its K/V once for the group and attends with the group's queries together."""
    b, h = selection.mode.shape
    if h == hkv or h % hkv:
        return selection
    group = h // hkv
    k_valid = torch.arange(selection.indices.shape[2], device=selection.device) < selection.count[..., None]
    listed = torch.where(k_valid, selection.indices, -1)
    parts = [selection.mode, selection.count]
    # window data matters only for WINDOW rows, listed indices only for POSITIONS / BLOCKS rows
    win = selection.mode == DecodeMode.WINDOW
    parts += [torch.where(win, selection.sink, 0), torch.where(win, selection.window, 0)]
    sig = torch.cat([p.view(b, h, 1) for p in parts] + [listed], dim=2).view(b, hkv, group, -1)
    if not bool((sig == sig[:, :, :1]).all()):
        return selection
    pick = lambda t: t.view(b, hkv, group, *t.shape[2:])[:, :, 0]  # noqa: E731
    return DecodeSelection(pick(selection.mode), pick(selection.sink), pick(selection.window),
                           pick(selection.indices), pick(selection.count), selection.block_size)


def _check_decode_inputs(q, k_cache, v_cache, block_table, seq_lens, selection) -> None:
    b, hq, d = q.shape
    nb, hkv, bs, dk = k_cache.shape
    if dk != d or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"sparse_decode: caches have shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)}, "
            f"expected [num_blocks, Hkv, block_size, {d}] each"
        )
    if hq % hkv:
        raise ValueError(f"sparse_decode: {hq} query heads is not a multiple of {hkv} KV heads")
    if selection.batch != b or selection.num_heads not in (hq, hkv):
        raise ValueError(
            f"sparse_decode: selection is [{selection.batch}, {selection.num_heads}], expected "
            f"[{b}, {hq} (query heads) or {hkv} (KV heads)]"
        )
    if block_table.shape[0] != b or seq_lens.shape[0] != b:
        raise ValueError(
            f"sparse_decode: block_table {tuple(block_table.shape)} / seq_lens {tuple(seq_lens.shape)} "
            f"do not have the batch size {b}"
        )


def sparse_decode_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selection: DecodeSelection,
    scale: float | None = None,
    return_lse: bool = False,
):
    """One decode step: each query attends to the cached tokens its selection names.

    q: ``[B, Hq, D]``; k_cache, v_cache: ``[num_blocks, Hkv, block_size, D]`` (strided views);
    block_table: ``[B, max_blocks]`` int; seq_lens: ``[B]`` int (cached tokens, the current one
    included); selection: head axis Hq, or Hkv (shared by each GQA group).
    Returns ``out [B, Hq, D]`` in q's dtype and, with ``return_lse``, ``lse [B, Hq]`` fp32.
    """
    _check_decode_inputs(q, k_cache, v_cache, block_table, seq_lens, selection)
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dev = q.device
    selection = shared_by_group(selection.to(dev), hkv)
    seq_lens = seq_lens.to(dev)
    hs = selection.num_heads
    per_row = hq // hs  # queries sharing one selection row: the GQA group, or 1
    n = b * hs
    counts = selected_counts(selection, seq_lens).view(n)
    out = torch.zeros(n, per_row, d, dtype=torch.float32, device=dev)
    lse = torch.full((n, per_row), float("-inf"), dtype=torch.float32, device=dev)
    width = int(counts.max().item()) if n else 0
    if width > 0:
        pos, valid = selection_positions(selection, seq_lens, width)  # [B, Hs, W]
        pos, valid = pos.view(n, width), valid.view(n, width)
        q_rows = q.reshape(n, per_row, d)  # a row's query heads are adjacent (kv head = h // group)
        kvh = (torch.arange(hs, device=dev) // max(1, hs // hkv)).repeat(b)  # [n]
        req = torch.arange(b, device=dev).repeat_interleave(hs)  # [n]
        bs = k_cache.shape[2]
        order = torch.argsort(counts, stable=True)
        for i, j, w in chunks(counts[order].tolist(), KEY_SLOT_BUDGET):
            rows = order[i:j]
            p = pos[rows, :w]
            blk = block_table[req[rows]].long().gather(1, p // bs)  # [n, w] physical blocks
            h = kvh[rows, None].expand_as(p)
            kr, vr = k_cache[blk, h, p % bs], v_cache[blk, h, p % bs]  # [n, w, D]
            o, l = attend(q_rows[rows], kr.to(q.dtype), vr.to(q.dtype), valid[rows, None, :w], scale)
            out[rows], lse[rows] = o, l
    out, lse = out.view(b, hq, d), lse.view(b, hq)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
