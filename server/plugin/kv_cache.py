"""The paged KV cache as headwise keeps it, written and read with torch indexing.

vLLM hands every layer a cache tensor with the logical shape ``[num_blocks, Hkv, block_size, 2*D]``
(head-major pages: the ``LBHNC`` layout the backend declares). Inside one (block, KV head) the
``block_size * 2*D`` values are laid out

* on CPU as vLLM's own CPU attention op reads them with its ``vec`` code path: the block's K
  transposed (``[D, block_size]``), then its V (``[block_size, D]``). vLLM's op then attends
  straight from the cache (dense decode rows), and torch reads both through strided views;
* on CPUs where stock vLLM runs its ``amx`` code path, in that path's packed layout whenever no torch
  kernel reads the pages in place (``cpu_ops.cache_isa``): only the op reads them then, and
  ``read_kv`` (the one torch reader left: estimation's keys) unpacks the pages it copies;
* on CUDA as K and V side by side per token (``[block_size, 2*D]``: K in the first half of the
  last dim), which the Triton kernels read as strided views.

``split_kv`` is the one place that knows this: every reader takes its ``k_cache, v_cache``
``[num_blocks, Hkv, block_size, D]`` views. Token at slot ``s`` lives in block ``s // block_size``
at offset ``s % block_size``; slot ``-1`` marks padding and is never written.
"""

from __future__ import annotations

import torch

from . import cpu_ops


def split_kv(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``[num_blocks, Hkv, block_size, D]`` of one layer's cache (no copy; the ``vec``
    layout on CPU: an AMX-packed cache has no such view)."""
    nb, h, bs, d2 = kv_cache.shape
    d = d2 // 2
    if kv_cache.device.type != "cpu":
        return kv_cache[..., :d], kv_cache[..., d:]
    halves = kv_cache.view(nb, h, 2, bs * d)
    return halves[:, :, 0].view(nb, h, d, bs).transpose(2, 3), halves[:, :, 1].view(nb, h, bs, d)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             isa: str = cpu_ops.CACHE_ISA, sync_free: bool | None = None) -> None:
    """Store the new tokens' K/V at their slots.

    key, value: ``[T, Hkv, D]`` (T may exceed the slots given: padding rows are ignored);
    kv_cache: ``[num_blocks, Hkv, block_size, 2*D]``; slot_mapping: ``[T']`` int, -1 = padding;
    ``isa``: the op layout the CPU cache keeps (``cpu_ops.cache_isa``); ``sync_free``: never read a
    device value back (default: on CUDA), so the write can sit inside a captured CUDA graph.
    """
    n = min(key.shape[0], slot_mapping.shape[0])
    if n == 0 or kv_cache.numel() == 0:
        return
    key, value = key[:n].to(kv_cache.dtype), value[:n].to(kv_cache.dtype)
    if cpu_ops.decode_available(kv_cache):  # vLLM's fused writer: the same layout; it skips slot -1
        cpu_ops.write(key, value, kv_cache, slot_mapping[:n].long(), isa)
        return
    if isa != cpu_ops.CACHE_ISA:
        raise ValueError(f"only vLLM's op writes the {isa!r} layout, and it cannot write this cache")
    slots = slot_mapping[:n].long()
    valid = slots >= 0
    k_cache, v_cache = split_kv(kv_cache)
    bs = kv_cache.shape[2]
    if kv_cache.device.type != "cpu" if sync_free is None else sync_free:
        # Padding rows write slot 0 back with what it holds: vLLM never hands block 0 to a request
        # (its null block), so no real token shares that slot and nothing is read back to the host.
        safe = torch.where(valid, slots, 0)
        blk, off = safe // bs, safe % bs
        keep = valid.view(-1, 1, 1)
        k_cache[blk, :, off] = torch.where(keep, key, k_cache[blk, :, off])
        v_cache[blk, :, off] = torch.where(keep, value, v_cache[blk, :, off])
        return
    if not bool(valid.all()):
        keep = valid.nonzero().squeeze(1)
        slots, key, value = slots[keep], key[keep], value[keep]
    if kv_cache.device.type == "cpu":
        runs = _slot_runs(slots, bs)
        if runs is not None:
            # a prefill's slots are runs of consecutive offsets inside a block: two slice copies per
            # run are ~20x faster on CPU than element-wise index_put of the same bytes
            for i0, i1, s in runs:
                blk, off = divmod(s, bs)
                k_cache[blk, :, off:off + i1 - i0] = key[i0:i1].transpose(0, 1)
                v_cache[blk, :, off:off + i1 - i0] = value[i0:i1].transpose(0, 1)
            return
    blk, off = slots // bs, slots % bs
    # advanced indices on dims 0 and 2 around a slice: the selected view is [n, Hkv, D]
    k_cache[blk, :, off] = key
    v_cache[blk, :, off] = value


_MAX_RUNS = 64  # more runs than this (a batch of decodes: one token each) -> one indexed write


def _slot_runs(slots: torch.Tensor, block_size: int) -> list[tuple[int, int, int]] | None:
    """``(first row, end row, first slot)`` of each run of consecutive slots within one block,
    or None when there are more than ``_MAX_RUNS`` of them."""
    n = slots.shape[0]
    blk = slots // block_size
    cut = (slots[1:] != slots[:-1] + 1) | (blk[1:] != blk[:-1])
    starts = [0] + (torch.nonzero(cut).squeeze(1) + 1).tolist()
    if len(starts) > _MAX_RUNS:
        return None
    ends = starts[1:] + [n]
    return list(zip(starts, ends, slots[starts].tolist()))


def read_kv(kv_cache: torch.Tensor, block_table_row: torch.Tensor, length: int,
            keys_only: bool = False, isa: str = cpu_ops.CACHE_ISA) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions ``0..length-1`` of one request as contiguous ``k, v: [length, Hkv, D]`` (whole
    blocks are copied, then trimmed: one block-level gather instead of a per-token one).
    ``keys_only``: copy K alone (pattern estimation needs no V) and return ``v = None``.
    ``isa``: the op layout the CPU cache keeps (AMX pages are gathered, then unpacked)."""
    if isa != cpu_ops.CACHE_ISA and kv_cache.device.type == "cpu":
        k_pages, v_pages = cpu_ops.page_views(kv_cache)
        nb, h, bs, d = k_pages.shape
        blocks = block_table_row[:-(-length // bs)].long()
        k, v = cpu_ops.unpack_pages(k_pages[blocks], None if keys_only else v_pages[blocks], isa)
        k = k.transpose(1, 2).reshape(-1, h, d)[:length]
        return k, None if v is None else v.transpose(1, 2).reshape(-1, h, d)[:length]
    k_cache, v_cache = split_kv(kv_cache)
    nb, h, bs, d = k_cache.shape
    blocks = block_table_row[:-(-length // bs)].long()

    def gather(cache: torch.Tensor) -> torch.Tensor:
        return cache[blocks].transpose(1, 2).reshape(-1, h, d)[:length].contiguous()  # one block: a view

    return gather(k_cache), None if keys_only else gather(v_cache)
