"""One entry point per operation: Triton on CUDA, torch elsewhere.

``HEADWISE_FORCE_TORCH=1`` forces the torch path everywhere (debugging a kernel against its
oracle on the same machine). The Triton modules are imported only when a CUDA tensor arrives, so
CPU processes never import Triton kernels (and tests can decide when the interpreter is on).
"""

from __future__ import annotations

import os

import torch

from .decode import sparse_decode_torch
from .index import DecodeSelection, SparseIndex
from .prefill import sparse_prefill_paged_torch, sparse_prefill_torch
from .varlen import VarlenIndex, sparse_prefill_varlen_paged_torch, sparse_prefill_varlen_torch


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve tensors on ``t``'s device."""
    return t.is_cuda and os.environ.get("HEADWISE_FORCE_TORCH", "0") != "1"


def sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                   scale: float | None = None, return_lse: bool = False, out: torch.Tensor | None = None):
    """q ``[Tq, Hq, D]``, k/v ``[S, Hkv, D]`` -> out ``[Tq, Hq, D]`` (+ lse ``[Hq, Tq]`` fp32);
    written into ``out`` (contiguous, q's shape and dtype) when given."""
    if use_triton(q):
        from .prefill_triton import sparse_prefill_triton

        return sparse_prefill_triton(q, k, v, index, scale, return_lse, out)
    return sparse_prefill_torch(q, k, v, index, scale, return_lse, out)


def sparse_prefill_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_table_row: torch.Tensor, index: SparseIndex,
                         scale: float | None = None, return_lse: bool = False):
    """Like ``sparse_prefill`` with K/V read from the paged cache ``[num_blocks, Hkv, bs, D]``."""
    if use_triton(q):
        from .prefill_triton import sparse_prefill_paged_triton

        return sparse_prefill_paged_triton(q, k_cache, v_cache, block_table_row, index, scale, return_lse)
    return sparse_prefill_paged_torch(q, k_cache, v_cache, block_table_row, index, scale, return_lse)


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, selection: DecodeSelection,
                  scale: float | None = None, return_lse: bool = False):
    """q ``[B, Hq, D]`` over paged caches -> out ``[B, Hq, D]`` (+ lse ``[B, Hq]`` fp32)."""
    if use_triton(q):
        from .decode_triton import sparse_decode_triton

        return sparse_decode_triton(q, k_cache, v_cache, block_table, seq_lens, selection, scale, return_lse)
    return sparse_decode_torch(q, k_cache, v_cache, block_table, seq_lens, selection, scale, return_lse)


def sparse_prefill_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_starts: list[int],
                          index: VarlenIndex, scale: float | None = None, return_lse: bool = False,
                          out: torch.Tensor | None = None):
    """Several chunks in one launch: q ``[T, Hq, D]`` with chunk r at ``index.layout``'s rows; k/v
    ``[S_total, Hkv, D]`` packed, chunk r's keys from ``kv_starts[layout.reqs[r]]``. Writes those
    rows of ``out`` (default: a new tensor like q)."""
    if use_triton(q):
        from .prefill_triton import sparse_prefill_varlen_triton

        return sparse_prefill_varlen_triton(q, k, v, kv_starts, index, scale, return_lse, out)
    return sparse_prefill_varlen_torch(q, k, v, kv_starts, index, scale, return_lse, out)


def sparse_prefill_varlen_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_table: torch.Tensor, index: VarlenIndex,
                                scale: float | None = None, return_lse: bool = False,
                                out: torch.Tensor | None = None):
    """Several chunks in one launch, K/V of chunk r read through ``block_table[layout.reqs[r]]``."""
    if use_triton(q):
        from .prefill_triton import sparse_prefill_varlen_paged_triton

        return sparse_prefill_varlen_paged_triton(q, k_cache, v_cache, block_table, index, scale, return_lse, out)
    return sparse_prefill_varlen_paged_torch(q, k_cache, v_cache, block_table, index, scale, return_lse, out)


def triton_estimate(t: torch.Tensor, head_dim: int):
    """The Triton estimation module when ``t`` is served by Triton and the head dim fits its
    kernels (64 or 128), else None (the caller runs its torch code)."""
    if use_triton(t) and head_dim in (64, 128):
        from . import estimate_triton

        return estimate_triton
    return None
