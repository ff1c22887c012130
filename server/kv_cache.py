"""The paged KV cache as headwise keeps it: plain torch layout, written with torch indexing.

vLLM hands every layer a cache tensor with the logical shape ``[num_blocks, Hkv, block_size, 2*D]``
(K in the first half of the last dim, V in the second); the backend chooses the physical layout
(``LBHNC``: head-major pages, so one KV head's tokens of a block are contiguous). The stock CPU
backend packs pages per instruction set; headwise overrides it, so it writes and reads its own
plain layout here, and the kernels read ``k_cache = kv_cache[..., :D]`` / ``v_cache = kv_cache[..., D:]``
as strided views.

Token at slot ``s`` lives in block ``s // block_size`` at offset ``s % block_size``; slot ``-1``
marks padding and is never written.
"""

from __future__ import annotations

import torch


def split_kv(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Strided K and V views ``[num_blocks, Hkv, block_size, D]`` of one layer's cache."""
    d = kv_cache.shape[-1] // 2
    return kv_cache[..., :d], kv_cache[..., d:]


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V at their slots.

    key, value: ``[T, Hkv, D]`` (T may exceed the slots given: padding rows are ignored);
    kv_cache: ``[num_blocks, Hkv, block_size, 2*D]``; slot_mapping: ``[T']`` int, -1 = padding.
    """
    n = min(key.shape[0], slot_mapping.shape[0])
    if n == 0 or kv_cache.numel() == 0:
        return
    slots = slot_mapping[:n].long()
    key, value = key[:n], value[:n]
    valid = slots >= 0
    # A host check is cheap on CPU; on CUDA it costs one sync per layer, acceptable while the
    # backend runs attention eagerly (it declares no CUDA-graph support).
    if not bool(valid.all()):
        keep = valid.nonzero().squeeze(1)
        slots, key, value = slots[keep], key[keep], value[keep]
    bs = kv_cache.shape[2]
    d = key.shape[-1]
    key, value = key.to(kv_cache.dtype), value.to(kv_cache.dtype)
    if kv_cache.device.type == "cpu":
        runs = _slot_runs(slots, bs)
        if runs is not None:
            # a prefill's slots are runs of consecutive offsets inside a block: two slice copies per
            # run are ~20x faster on CPU than element-wise index_put of the same bytes
            for i0, i1, s in runs:
                blk, off = divmod(s, bs)
                kv_cache[blk, :, off:off + i1 - i0, :d] = key[i0:i1].transpose(0, 1)
                kv_cache[blk, :, off:off + i1 - i0, d:] = value[i0:i1].transpose(0, 1)
            return
    blk, off = slots // bs, slots % bs
    # advanced indices on dims 0 and 2 around a slice: the selected view is [n, Hkv, D]
    kv_cache[blk, :, off, :d] = key
    kv_cache[blk, :, off, d:] = value


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
            keys_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions ``0..length-1`` of one request as ``k, v: [length, Hkv, D]`` (whole blocks are
    copied, then trimmed: one block-level gather instead of a per-token one). ``keys_only``: copy
    K alone (pattern estimation needs no V) and return ``v = None``."""
    bs = kv_cache.shape[2]
    d = kv_cache.shape[-1] // 2
    n_blocks = -(-length // bs)
    blocks = block_table_row[:n_blocks].long()
    width = d if keys_only else 2 * d
    rows = kv_cache[blocks, :, :, :width]  # [n, Hkv, bs, width]
    rows = rows.transpose(1, 2).reshape(n_blocks * bs, kv_cache.shape[1], width)[:length]
    return (rows, None) if keys_only else (rows[..., :d], rows[..., d:])
