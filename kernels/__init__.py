"""headwise.kernels: the sparse index formats and the attention kernels that consume them.

Public API: ``SparseIndex``, ``DecodeSelection``, ``DecodeMode`` (formats) and the dispatching
entry points ``sparse_prefill``, ``sparse_prefill_paged``, ``sparse_decode`` and the batched
``sparse_prefill_varlen`` / ``sparse_prefill_varlen_paged`` over a ``VarlenIndex`` (Triton on
CUDA, torch on CPU; ``HEADWISE_FORCE_TORCH=1`` forces torch). The torch implementations are importable directly for tests and CPU callers.
"""

from .decode import sparse_decode_torch
from .dispatch import (sparse_decode, sparse_prefill, sparse_prefill_paged, sparse_prefill_varlen,
                       sparse_prefill_varlen_paged, use_triton)
from .index import BLOCK_M, DecodeMode, DecodeSelection, SparseIndex
from .prefill import sparse_prefill_paged_torch, sparse_prefill_torch
from .reference import decode_attention_reference, masked_attention_reference
from .varlen import VarlenIndex, VarlenLayout, sparse_prefill_varlen_paged_torch, sparse_prefill_varlen_torch

__all__ = [
    "BLOCK_M",
    "DecodeMode",
    "DecodeSelection",
    "SparseIndex",
    "VarlenIndex",
    "VarlenLayout",
    "decode_attention_reference",
    "masked_attention_reference",
    "sparse_decode",
    "sparse_decode_torch",
    "sparse_prefill",
    "sparse_prefill_paged",
    "sparse_prefill_paged_torch",
    "sparse_prefill_torch",
    "sparse_prefill_varlen",
    "sparse_prefill_varlen_paged",
    "sparse_prefill_varlen_paged_torch",
    "sparse_prefill_varlen_torch",
    "use_triton",
]
