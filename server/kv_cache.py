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
    blk, off = slots // bs, slots % bs
    # advanced indices on dims 0 and 2 around a slice: the selected view is [n, Hkv, D]
    kv_cache[blk, :, off, :d] = key.to(kv_cache.dtype)
    kv_cache[blk, :, off, d:] = value.to(kv_cache.dtype)


def read_kv(kv_cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``0..length-1`` of one request as contiguous ``k, v: [length, Hkv, D]`` (tests, debugging)."""
    bs = kv_cache.shape[2]
    pos = torch.arange(length, device=kv_cache.device)
    blk = block_table_row.long()[pos // bs]
    rows = kv_cache[blk, :, pos % bs]  # [length, Hkv, 2D]
    d = kv_cache.shape[-1] // 2
    return rows[..., :d], rows[..., d:]
