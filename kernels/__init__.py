"""headwise.kernels: the sparse index formats and the attention kernels that consume them.

Public API: ``SparseIndex``, ``DecodeSelection``, ``DecodeMode`` (formats) and the dispatching
entry points ``sparse_prefill``, ``sparse_prefill_paged``, ``sparse_decode`` (Triton on CUDA,
torch on CPU). The torch implementations are importable directly for tests and CPU callers.
"""

from .decode import sparse_decode_torch
from .dispatch import sparse_decode, sparse_prefill, sparse_prefill_paged, use_triton
from .index import BLOCK_M, DecodeMode, DecodeSelection, SparseIndex
from .prefill import sparse_prefill_paged_torch, sparse_prefill_torch
from .reference import decode_attention_reference, masked_attention_reference

__all__ = [
    "BLOCK_M",
    "DecodeMode",
    "DecodeSelection",
    "SparseIndex",
    "decode_attention_reference",
    "masked_attention_reference",
    "sparse_decode",
    "sparse_decode_torch",
    "sparse_prefill",
    "sparse_prefill_paged",
    "sparse_prefill_paged_torch",
    "sparse_prefill_torch",
    "use_triton",
]
