"""One layer's sparse attention for a given batch: the code the vLLM impl and the transformers
integration (``hf.py``) share, so that the two cannot drift apart.

Both hosts hand over what they have of one layer: a ``LayerBinding`` (the plan's specs for the
heads served here), the plan's settings, the queries, and keys in the layout the kernels read.
The runner builds the layer's prefill ``SparseIndex`` or decode ``DecodeSelection`` (static
patterns from the host's per-step cache), launches the kernel through ``KERNELS`` (looked up at
call time, so routing tests can put recording fakes there) and counts what was kept.

What differs between the hosts stays with them: the vLLM impl reads a paged cache, runs static
work planned once per step and vLLM's fused CPU op; the transformers integration has contiguous
per-request K/V and an HF cache viewed as a paged cache with one block per request.
"""

from __future__ import annotations

from typing import Any

import torch

from headwise import kernels
from headwise.kernels.decode import selected_counts
from headwise.kernels.index import DecodeSelection, SparseIndex
from headwise.patterns.decode import build_layer_decode_selection, select_heads
from headwise.patterns.prefill import build_layer_prefill_index

from . import cpu_ops, cuda_ops
from .plan_binding import LayerBinding

# name -> callable; looked up per call (tests replace entries to record the routing)
KERNELS: dict[str, Any] = {
    "sparse_prefill": kernels.sparse_prefill,  # contiguous K/V (transformers)
    "sparse_prefill_paged": kernels.sparse_prefill_paged,  # K/V in the paged cache (vLLM, per row)
    "sparse_prefill_varlen_paged": kernels.sparse_prefill_varlen_paged,  # every row of a step, one launch (CUDA)
    "sparse_decode": kernels.sparse_decode,
    "native_batch": cpu_ops.run,  # vLLM's CPU op over the real cache; None: never use it
    "flash": cuda_ops.run,  # vLLM's FlashAttention over the real cache (CUDA); None: never use it
}


def prefill_index(lb: LayerBinding, settings, q: torch.Tensor | None, k: torch.Tensor | None, q_offset: int,
                  total_len: int, scale: float, *, q_len: int | None = None, cache: dict | None = None,
                  ends_prompt: bool = True) -> SparseIndex:
    """The layer's index for one request's chunk. q: ``[Tq, Hq_local, D]`` (None when every spec is
    static: pass ``q_len``); k: ``[S, Hkv_local, D]``, every key of the request (None if static).
    ``ends_prompt``: the chunk holds the prompt's last token, so its last ``dense_tail`` queries are
    the prompt's and attend densely (an earlier chunk of a chunked prefill has no dense tail)."""
    device = q.device if q is not None else (k.device if k is not None else torch.device("cpu"))
    return build_layer_prefill_index(
        lb.prefill_specs, lb.heads, lb.num_layer_heads, q, k, lb.on("kv_heads", device), q_offset, total_len,
        settings.block_size, q_len=q_len, num_layer_kv_heads=lb.num_layer_kv_heads, dense_below=settings.dense_below,
        dense_tail=settings.dense_tail if ends_prompt else 0, scale=scale, cache=cache)


def decode_selection(lb: LayerBinding, settings, q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, total_lens: torch.Tensor, scale: float, tidal=None,
                     page_summaries=None, max_seq_len: int | None = None) -> DecodeSelection:
    """The layer's selection for a batch of decode rows. q: ``[B, Hq_local, D]``; ``k_cache``
    ``[blocks, Hkv_local, block_size, D]`` read through ``block_table`` ``[B, max_blocks]``. When
    every head of a GQA group selects the same tokens the rows are per KV head (``[B, Hkv]``).
    ``page_summaries``: the layer's Quest min/max kept beside the cache (None: recomputed);
    ``max_seq_len``: a host bound on ``seq_lens`` that fixes the selections' widths (no read-back)."""
    sel = build_layer_decode_selection(
        lb.decode_specs, lb.heads, lb.num_layer_heads, q, k_cache, block_table, seq_lens, total_lens,
        lb.on("kv_heads", q.device), scale=scale, num_layer_kv_heads=lb.num_layer_kv_heads, tidal_state=tidal,
        tidal_top_k=settings.tidal_top_k, dense_below=settings.dense_below, page_summaries=page_summaries,
        max_seq_len=max_seq_len)
    if lb.decode_group_heads is not None:  # [B, Hq] -> [B, Hkv]: a GQA group shares its rows
        sel = select_heads(sel, lb.on("decode_group_heads", sel.device))
    return sel


def decode_kept(lb: LayerBinding, sel: DecodeSelection, seq_lens: torch.Tensor) -> torch.Tensor:
    """(query, key) pairs the selection keeps over the layer's local heads, a 0-d tensor (no sync)."""
    kept = selected_counts(sel, seq_lens).sum()
    return kept * (len(lb.heads) // sel.num_heads)  # a shared row serves its whole group


def without_heads(index: SparseIndex, keep: torch.Tensor) -> SparseIndex:
    """``index`` with no keys for the heads where ``keep`` (``[H, 1]`` int32, on the index's device)
    is 0: their rows are computed elsewhere, and the kernel skips them."""
    return SparseIndex(index.range_start, index.range_end, index.range_count * keep, index.columns,
                       index.column_count * keep, index.q_len, index.q_offset, index.block_m)


def run_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, sel: DecodeSelection, scale: float) -> torch.Tensor:
    return KERNELS["sparse_decode"](q, k_cache, v_cache, block_table, seq_lens, sel, scale=scale)


def run_prefill_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table_row: torch.Tensor,
                      index: SparseIndex, scale: float) -> torch.Tensor:
    return KERNELS["sparse_prefill_paged"](q, k_cache, v_cache, table_row, index, scale=scale)


def run_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, scale: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    return KERNELS["sparse_prefill"](q, k, v, index, scale, out=out)
