"""Decode-time selection at long context: top-k over the paged cache in tiles, Quest's summaries.

* ``decode_topk`` (TidalDecode): the top ``k`` cached positions of each (request, query head) by
  ``q . k``. On CPU the cache is read a tile of pages at a time and merged into a running
  ``torch.topk`` (never a full sort, never a ``[B, H, S]`` matrix or a contiguous copy of the
  keys); on CUDA the Triton scorer writes ``[B, H, S]`` and ``torch.topk`` ranks it.
* ``PageSummaries`` / ``update_page_summaries`` (Quest): per-channel key min/max of every
  physical page, kept beside the paged cache and updated where K is written, so a decode step
  reads ``S / page`` summaries instead of the whole K cache. ``page_topk`` scores them with
  ``q+ . max + q- . min`` (two matmuls; the same bound as ``sum_d max(q_d min_d, q_d max_d)``).

Positions and pages come back sorted ascending below their counts (padding 0), as
``DecodeSelection`` wants. No function here reads a device value back on the host when the
caller passes ``max_len``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .dispatch import triton_estimate

_TILE_ELEMS = 1 << 20  # key elements gathered per tile: small enough that its fp32 copy stays in cache
_MERGE_SPAN = 1 << 13  # cached positions scored before each running top-k merge


def _group(kv_heads: torch.Tensor, hkv: int) -> int | None:
    """GQA group size when ``kv_heads`` is ``arange(H) // G`` (checked on the host, only for a CPU
    tensor: no device sync), else None (the caller gathers per head)."""
    h = kv_heads.shape[0]
    if kv_heads.device.type != "cpu" or h % hkv:
        return None
    g = h // hkv
    return g if torch.equal(kv_heads.long(), torch.arange(h) // g) else None


def _scores(q: torch.Tensor, keys: torch.Tensor, kv_heads: torch.Tensor, group: int | None) -> torch.Tensor:
    """q ``[B, H, D]``, keys ``[B, Hkv, T, D]`` (same dtype) -> ``[B, H, T]``."""
    b, h, d = q.shape
    if group is not None:
        return torch.matmul(q.view(b, -1, group, d), keys.transpose(-1, -2)).view(b, h, -1)
    return torch.einsum("bhd,bhtd->bht", q, keys.index_select(1, kv_heads.to(keys.device).long()))


def _merge(vals: torch.Tensor, idx: torch.Tensor, tile: torch.Tensor, tile_idx: torch.Tensor, k: int):
    """Running top-``k``: the best ``k`` of ``(vals, idx)`` and a new tile of scores."""
    vals = torch.cat([vals, tile], -1)
    idx = torch.cat([idx, tile_idx.expand(*tile.shape[:-1], -1)], -1)
    vals, top = torch.topk(vals, min(k, vals.shape[-1]), dim=-1)
    return vals, torch.gather(idx, -1, top)


def _gather_heads(k_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, nb, bs, D]``: the pages ``blocks [B, nb]`` of every KV head, gathered in one copy
    already in head-major order (what a per-head matmul wants), never a copy of the whole cache."""
    nblk, hkv, bsz, d = k_cache.shape
    heads = torch.arange(hkv, device=k_cache.device).view(1, hkv, 1)
    rows = blocks.long()[:, None, :]
    if hkv == 1 or k_cache.stride(0) == hkv * k_cache.stride(1):  # (block, head) rows merge: one row copy
        return k_cache.flatten(0, 1).index_select(0, (rows * hkv + heads).flatten()).view(*rows.shape[:1], hkv, -1, bsz, d)
    return k_cache[rows, heads]


def _sorted_kept(vals: torch.Tensor, idx: torch.Tensor):
    """Positions of the kept (finite or +inf) entries ascending, padded with 0; and their counts."""
    keep = vals > float("-inf")
    big = torch.iinfo(torch.int32).max
    out = torch.sort(torch.where(keep, idx, big), dim=-1).values
    count = keep.sum(-1)
    return torch.where(torch.arange(out.shape[-1], device=out.device) < count[..., None], out, 0), count


def decode_topk(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                kv_heads: torch.Tensor, top_k: int, window: int = 1, scale: float | None = None,
                max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``top_k`` positions per (request, head) by ``q . k``, the last ``window`` forced in.

    q: ``[B, H, D]``; k_cache: ``[num_blocks, Hkv, block_size, D]``; block_table ``[B, max_blocks]``;
    seq_lens ``[B]``. Returns positions ``[B, H, min(top_k, max_len)]`` sorted and counts ``[B, H]``.
    """
    b, h, d = q.shape
    dev = q.device
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    max_len = int(seq_lens.max().item()) if max_len is None else max_len
    lens = seq_lens.to(dev).long().view(b, 1, 1)
    w = min(top_k, max(1, max_len))
    win = max(1, min(window, top_k))

    def rules(s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # s [B, H, T], pos [T]
        s = s.masked_fill(pos.view(1, 1, -1) >= lens, float("-inf"))
        return s.masked_fill((pos.view(1, 1, -1) >= lens - win) & (pos.view(1, 1, -1) < lens), float("inf"))

    if (tr := triton_estimate(q, d)) is not None:  # CUDA: one scoring launch, then a partial selection
        s = tr.decode_scores(q, k_cache, block_table, seq_lens, kv_heads, scale, max_len=max_len)
        pos = torch.arange(max_len, device=dev)
        vals, idx = torch.topk(rules(s, pos), w, dim=-1)
        return _sorted_kept(vals, idx)
    bsz, hkv = k_cache.shape[2], k_cache.shape[1]
    group = _group(kv_heads, hkv)
    qs = q.float() * sc
    blocks_per_tile = max(1, _TILE_ELEMS // max(1, b * hkv * bsz * d))
    tiles_per_merge = max(1, _MERGE_SPAN // (blocks_per_tile * bsz))
    vals = torch.full((b, h, 0), float("-inf"), device=dev)
    idx = torch.zeros(b, h, 0, dtype=torch.long, device=dev)
    n_blocks = -(-max_len // bsz)

    def tile_scores(j0: int, j1: int) -> torch.Tensor:  # [B, H, (j1 - j0) * bsz]
        keys = _gather_heads(k_cache, block_table[:, j0:j1]).to(torch.float32, memory_format=torch.contiguous_format)
        return _scores(qs, keys.view(b, hkv, (j1 - j0) * bsz, d), kv_heads, group)  # fp32, row-major: one copy

    span = blocks_per_tile * tiles_per_merge  # blocks scored before each running top-k merge
    for m0 in range(0, n_blocks, span):
        m1 = min(n_blocks, m0 + span)
        s = torch.cat([tile_scores(j0, min(m1, j0 + blocks_per_tile)) for j0 in range(m0, m1, blocks_per_tile)], -1)
        pos = torch.arange(m0 * bsz, m1 * bsz, device=dev)
        vals, idx = _merge(vals, idx, rules(s, pos), pos, w)
    return _sorted_kept(vals, idx)


# ------------------------------------------------------------------------ Quest summaries
@dataclass
class PageSummaries:
    """Key min/max per physical *unit* of ``unit`` slots, beside a paged cache.

    kmin, kmax: ``[num_slots // unit + 1, Hkv, D]`` in the cache's dtype (min/max of bf16 values
    are bf16 values: exact, half the bytes of fp32); the last row absorbs padding writes.
    Unit ``u`` covers slots ``[u * unit, (u + 1) * unit)``; ``unit`` divides the cache block size.
    """

    kmin: torch.Tensor
    kmax: torch.Tensor
    unit: int
    block_size: int

    @classmethod
    def empty(cls, num_blocks: int, block_size: int, page_size: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> "PageSummaries":
        unit = math.gcd(page_size, block_size)
        n = num_blocks * block_size // unit + 1
        kmin = torch.full((n, num_kv_heads, head_dim), float("inf"), dtype=dtype, device=device)
        return cls(kmin, torch.full_like(kmin, float("-inf")), unit, block_size)

    @property
    def spare(self) -> int:
        return self.kmin.shape[0] - 1


def update_page_summaries(summary: PageSummaries, key: torch.Tensor, slot_mapping: torch.Tensor,
                          block_size: int) -> None:
    """Fold newly written keys into ``summary``, in place (call it where K/V are written).

    key: ``[T, Hkv, D]`` the keys just written; slot_mapping: ``[T]`` their cache slots
    (``block * block_size + offset``; negative = padding, skipped). Tokens fill a unit in position
    order, so a write to a unit's first slot means the unit is being (re)filled by a new owner:
    it is reset before this call's keys are folded in. That makes freed-and-reused blocks
    (preemption, eviction) exact without any free hook; a prefix-cache hit writes nothing and
    finds its units' summaries still valid (they are per physical unit, not per request).
    """
    if block_size != summary.block_size:
        raise ValueError(f"update_page_summaries: cache block size {block_size}, summaries made for "
                         f"{summary.block_size}")
    slots = slot_mapping.to(key.device).long()
    valid = slots >= 0
    unit = torch.where(valid, slots // summary.unit, summary.spare)
    first = valid & (slots % summary.unit == 0)
    reset = torch.where(first, unit, summary.spare)
    summary.kmin.index_fill_(0, reset, float("inf"))
    summary.kmax.index_fill_(0, reset, float("-inf"))
    at = unit.view(-1, 1, 1).expand_as(key)
    k = key.to(summary.kmin.dtype)
    summary.kmin.scatter_reduce_(0, at, k, reduce="amin", include_self=True)
    summary.kmax.scatter_reduce_(0, at, k, reduce="amax", include_self=True)
    summary.kmin[summary.spare] = float("inf")
    summary.kmax[summary.spare] = float("-inf")


def gather_page_bounds(summary: PageSummaries, block_table: torch.Tensor, page0: int, page1: int,
                       page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kmin, kmax)`` ``[B, page1 - page0, Hkv, D]`` of logical pages ``[page0, page1)`` of every request."""
    r = page_size // summary.unit  # units per logical page
    lu = torch.arange(page0 * r, page1 * r, device=block_table.device)  # logical units
    per_block = summary.block_size // summary.unit
    blk = block_table[:, torch.clamp(lu // per_block, max=block_table.shape[1] - 1)].long()
    phys = blk * per_block + lu % per_block  # [B, n * r]
    b = block_table.shape[0]
    lo = summary.kmin[phys].view(b, page1 - page0, r, *summary.kmin.shape[1:]).amin(2)
    hi = summary.kmax[phys].view(b, page1 - page0, r, *summary.kmax.shape[1:]).amax(2)
    return lo, hi


def _bounds_from_cache(k_cache, block_table, lens, page0: int, page1: int, page_size: int):
    """The same bounds recomputed from the keys themselves (no summaries kept): reads every key."""
    b, bsz = block_table.shape[0], k_cache.shape[2]
    pos = torch.arange(page0 * page_size, page1 * page_size, device=k_cache.device)
    blk = block_table[:, torch.clamp(pos // bsz, max=block_table.shape[1] - 1)].long()  # [B, T]
    keys = k_cache[blk, :, pos % bsz].float()  # [B, T, Hkv, D]
    ok = (pos.view(1, -1) < lens.view(-1, 1)).view(b, -1, 1, 1)
    shape = (b, page1 - page0, page_size, *keys.shape[2:])
    lo = keys.masked_fill(~ok, float("inf")).view(shape).amin(2)
    hi = keys.masked_fill(~ok, float("-inf")).view(shape).amax(2)
    return lo, hi


def page_topk(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
              kv_heads: torch.Tensor, page_size: int, n_keep: int, summary: PageSummaries | None = None,
              max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest: the ``n_keep`` best pages per (request, head), the current page forced in.

    Returns logical pages ``[B, H, min(n_keep, P)]`` sorted and counts ``[B, H]``. With ``summary``
    the bounds are read from it; without, they are recomputed from ``k_cache`` (the oracle).
    """
    b, h, d = q.shape
    dev = q.device
    max_len = int(seq_lens.max().item()) if max_len is None else max_len
    n_pages_max = max(1, -(-max_len // page_size))
    lens = seq_lens.to(dev).long()
    n_pages = ((lens + page_size - 1) // page_size).view(b, 1, 1)
    hkv = k_cache.shape[1]
    group = _group(kv_heads, hkv)
    qf = q.float()
    q_pos, q_neg = qf.clamp(min=0), qf.clamp(max=0)
    w = min(n_keep, n_pages_max)
    per = max(1, _TILE_ELEMS // max(1, b * hkv * d * (1 if summary is not None else page_size)))
    vals = torch.full((b, h, 0), float("-inf"), device=dev)
    idx = torch.zeros(b, h, 0, dtype=torch.long, device=dev)
    for p0 in range(0, n_pages_max, per):
        p1 = min(n_pages_max, p0 + per)
        if summary is not None:
            lo, hi = gather_page_bounds(summary, block_table, p0, p1, page_size)
        else:
            lo, hi = _bounds_from_cache(k_cache, block_table, lens, p0, p1, page_size)
        lo, hi = lo.float().transpose(1, 2), hi.float().transpose(1, 2)  # [B, Hkv, n, D]
        lo, hi = lo.nan_to_num(posinf=0.0, neginf=0.0), hi.nan_to_num(posinf=0.0, neginf=0.0)  # empty pages: masked below
        s = _scores(q_pos, hi, kv_heads, group) + _scores(q_neg, lo, kv_heads, group)  # [B, H, n]
        page = torch.arange(p0, p1, device=dev)
        s = s.masked_fill(page.view(1, 1, -1) >= n_pages, float("-inf"))
        s = s.masked_fill(page.view(1, 1, -1) == n_pages - 1, float("inf"))
        vals, idx = _merge(vals, idx, s, page, w)
    return _sorted_kept(vals, idx)
