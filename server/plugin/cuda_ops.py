"""vLLM's own FlashAttention, run straight on headwise's paged cache for the dense work on CUDA.

On CUDA the dense part of a step runs on the kernel stock vLLM runs, so dense costs what stock
costs: a layer that is dense for every row makes stock's one varlen call over the batch; dense
rows of a sparse layer (prompts below ``dense_below``) and heads whose whole GQA group is dense
make the same call with the other rows' key counts set to 0 (FlashAttention then skips them and
writes zeros, which the sparse kernels overwrite afterwards).

The cache keeps headwise's head-major pages ``[num_blocks, Hkv, block_size, 2*D]`` (K and V side by
side per token, ``kv_cache.split_kv``); FlashAttention reads ``[num_blocks, block_size, Hkv, D]``
views of them through their strides (no copy). Everything a call needs but the layer's tensors is
a ``FlashCall`` made once per step by the builder (``metadata.py``).

Not yet run on a GPU in this repository: the routing tests check which rows and heads reach this
op with a torch stand-in of the same contract (``tests/test_plugin_cuda_routing.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# dtypes and head sizes vLLM's FlashAttention runs (fp32 never: those layers use the sparse kernel)
DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class FlashCall:
    """One varlen call over the step's rows; rows with ``seqused_k == 0`` are skipped (zeros).

    cu_seqlens_q ``[B + 1]`` int32 and seqused_k ``[B]`` int32 on the device (vLLM's persistent
    buffers where the call is the whole batch's, so a captured decode graph reads them in place);
    ``rows``: the token rows of q/out the call covers; ``max_seqlen_k``: a host bound on the keys
    (the engine's max model length for calls a decode graph may capture)."""

    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    seqused_k: torch.Tensor
    max_seqlen_k: int
    block_table: torch.Tensor
    rows: slice


@functools.lru_cache(maxsize=1)
def _flash():
    """``(flash_attn_varlen_func, fa_version)`` of this vLLM build, or None (no CUDA build)."""
    try:
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version
    except Exception:  # CPU builds import fine but define no function on non-CUDA platforms
        return None
    if not torch.cuda.is_available():
        return None
    return flash_attn_varlen_func, get_flash_attn_version()


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether FlashAttention runs this cache (fp16/bf16, head dim a multiple of 8 up to 256)."""
    return dtype in DTYPES and head_dim % 8 == 0 and head_dim <= 256


def available(dtype: torch.dtype, head_dim: int) -> bool:
    return _flash() is not None and supports(dtype, head_dim)


def kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[num_blocks, block_size, Hkv, D]`` K and V views of headwise's CUDA cache (no copy)."""
    d = kv_cache.shape[-1] // 2
    return kv_cache[..., :d].transpose(1, 2), kv_cache[..., d:].transpose(1, 2)


def run(q: torch.Tensor, kv_cache: torch.Tensor, call: FlashCall, scale: float, out: torch.Tensor,
        heads: slice = slice(None), kv_heads: slice = slice(None)) -> None:
    """Causal attention of ``q[call.rows, heads]`` over the cached keys of ``kv_heads``, written into
    ``out[call.rows, heads]``. q, out: ``[T, Hq, D]``; kv_cache: ``[num_blocks, Hkv, bs, 2D]``."""
    fn, version = _flash()
    k, v = kv_views(kv_cache)
    fn(q=q[call.rows, heads], k=k[:, :, kv_heads], v=v[:, :, kv_heads], out=out[call.rows, heads],
       cu_seqlens_q=call.cu_seqlens_q, max_seqlen_q=call.max_seqlen_q, seqused_k=call.seqused_k,
       max_seqlen_k=call.max_seqlen_k, softmax_scale=scale, causal=True, block_table=call.block_table,
       fa_version=version)
