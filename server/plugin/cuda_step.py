"""CUDA: a step planned as one launch per layer (``impl.HeadwiseImpl._forward_batched``).

``metadata.HeadwiseMetadataBuilder`` calls ``plan`` once per step when the cache is on a GPU: the
sparse prefill rows of every layer run as one varlen launch of the sparse kernel (the static
groups' indices packed here on the step's ``VarlenLayout``; estimated ones packed per layer), and
dense rows, dense layers and heads whose whole GQA group is dense run on vLLM's FlashAttention
(``cuda_ops.FlashCall``, made here) where it runs the cache's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata

from headwise.kernels.varlen import VarlenIndex, VarlenLayout
from headwise.patterns.prefill import build_layer_prefill_index
from headwise.patterns.ranges import fast_density

from . import cuda_ops, runner
from .plan_binding import LayerBinding, PlanBinding


@dataclass
class BatchedWork:
    """CUDA: the step as one launch per layer (``impl.HeadwiseImpl._forward_batched``).

    ``rows``/``layout``: the prefill rows the sparse kernel runs, where their queries sit (every
    prefill row, less the dense ones when FlashAttention runs them); ``static``: per static layer
    signature, those rows' packed index (heads of whole dense GQA groups emptied when FlashAttention
    runs them); ``flash_rows[(layer prefill dense, layer decode dense)]``: the FlashAttention call
    over the rows that layer attends densely (None: none); ``flash_heads``: every prefill row, for
    a sparse layer's dense KV groups."""

    rows: list  # metadata.PrefillRow
    layout: VarlenLayout | None
    static: dict[int, VarlenIndex]
    flash: bool  # FlashAttention runs this cache (fp16/bf16) and is available
    flash_row_pairs: int = 0  # causal pairs per head of the prefill rows FlashAttention runs (dense rows)
    flash_rows: dict[tuple[bool, bool], cuda_ops.FlashCall | None] = field(default_factory=dict)
    flash_heads: cuda_ops.FlashCall | None = None



def plan(rows: list, cm: CommonAttentionMetadata, is_decode: torch.Tensor, binding: PlanBinding,
         groups: dict[int, list[LayerBinding]], flash: bool, dense_below: int, device: torch.device,
         max_seq_len: int | None) -> tuple[BatchedWork, dict[int, tuple[int, int]]]:
    """The step's launches (the kernel rows' layout and static indices, the FlashAttention calls)
    and, per static signature, the (kept, causal) pairs of its prefill rows over the local heads.
    ``rows``: the step's ``metadata.PrefillRow`` s; ``groups``: one list of layers per static prefill
    signature (the builder's); ``flash``: FlashAttention runs this cache."""
    settings = binding.settings
    kernel_rows = [r for r in rows if not (flash and r.dense)]
    layout = VarlenLayout.of([r.q_len for r in kernel_rows], [r.q_offset for r in kernel_rows],
                             [r.start for r in kernel_rows], [r.req for r in kernel_rows],
                             block_m=settings.block_size, device=device) if kernel_rows else None
    work = BatchedWork(kernel_rows, layout, {}, flash,
                       flash_row_pairs=sum(r.causal_pairs for r in rows if flash and r.dense))
    heads = binding.local_heads
    # rows FlashAttention runs keep every pair: dense rows, and every row of a dense layer
    full = sum(r.causal_pairs for r in rows) * heads
    pairs = dict.fromkeys(groups, (full, full))
    flash_only = work.flash_row_pairs * heads
    cache: dict = {}
    for sig, group in groups.items():
        lb = group[0]
        if layout is None or (flash and lb.prefill_dense):
            continue
        parts = [build_layer_prefill_index(
            lb.prefill_specs, lb.heads, lb.num_layer_heads, None, None, lb.kv_heads, row.q_offset,
            row.total_len, settings.block_size, q_len=row.q_len, num_layer_kv_heads=lb.num_layer_kv_heads,
            dense_below=dense_below, dense_tail=settings.dense_tail if row.ends_prompt else 0,
            cache=cache) for row in kernel_rows]
        kept = sum(round(fast_density(p) * r.causal_pairs * heads) for p, r in zip(parts, kernel_rows))
        pairs[sig] = (kept + flash_only, full)
        if flash and lb.dense_kv_runs:
            parts = [runner.without_heads(p, lb.dense_run_mask) for p in parts]
        work.static[sig] = VarlenIndex.pack(parts, device=device, layout=layout)
    if flash:
        b = cm.num_reqs
        dec = is_decode.tolist()
        dense_row = [False] * b
        for r in rows:
            dense_row[r.req] = r.dense
        for pre_dense in (False, True):
            for dec_dense in (False, True):
                live = [(d and dec_dense) or (not d and (pre_dense or dr)) for d, dr in zip(dec, dense_row)]
                work.flash_rows[(pre_dense, dec_dense)] = flash_call(cm, max_seq_len, live)
        work.flash_heads = flash_call(cm, max_seq_len, [not d for d in dec]) if layout is not None else None
    return work, pairs

def flash_call(cm: CommonAttentionMetadata, max_seq_len: int | None, live: list[bool]) -> cuda_ops.FlashCall | None:
    """FlashAttention over the whole batch; rows not ``live`` get no keys (skipped). Every row
    live: vLLM's own persistent tensors, so a captured graph reads the next step's values."""
    if not any(live):
        return None
    b = cm.num_reqs
    seq = cm.seq_lens[:b]
    if not all(live):
        seq = seq * torch.tensor(live, dtype=seq.dtype).to(seq.device, non_blocking=True)
    return cuda_ops.FlashCall(cm.query_start_loc[:b + 1], cm.max_query_len, seq,
                              max_seq_len or cm.max_seq_len, cm.block_table_tensor[:b],
                              slice(0, cm.num_actual_tokens))
