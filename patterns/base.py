"""What every pattern family receives: the inputs of one layer's index building.

A pattern family is one module in ``headwise.patterns`` with its pydantic parameter model(s), a
prefill index builder and/or a decode selector, and its expected density. The builders receive
the heads of one layer that share the same parameters, so identical heads are built together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillInputs:
    """One request's query chunk, for the heads of one layer that share a pattern.

    q:          ``[Tq, H, D]`` queries of those heads (None when the pattern is static).
    k:          ``[S, Hkv, D]`` every key of the request, prefix included (None when static).
    kv_heads:   ``[H]`` long, the KV head each built head reads (GQA: ``head // group``).
    heads:      the built heads' indices among the layer's *global* query heads (S2 strides
                and per-head parameters depend on them).
    num_layer_heads: query heads in the whole layer (global, before tensor parallelism).
    q_offset:   position of the first query (cached prefix length); ``S = q_offset + Tq``.
    q_len:      queries in the chunk.
    total_len:  prompt + planned generation length (MoA spans grow with it).
    block_m:    queries per index block.
    """

    heads: list[int]
    num_layer_heads: int
    q_offset: int
    q_len: int
    total_len: int
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    kv_heads: torch.Tensor | None = None
    block_m: int = 64

    @property
    def seq_len(self) -> int:
        return self.q_offset + self.q_len


@dataclass
class DecodeInputs:
    """One decode step of a batch, for the heads of one layer that share a pattern.

    q:           ``[B, H, D]`` the new token's query per built head (None when static).
    k_cache:     ``[num_blocks, Hkv, block_size, D]`` paged keys (a strided view is fine).
    block_table: ``[B, max_blocks]`` int32, logical block -> physical block.
    seq_lens:    ``[B]`` int32, cached tokens per request, the current one included.
    total_lens:  ``[B]`` int32, prompt + planned generation length per request (MoA).
    kv_heads:    ``[H]`` long, the KV head each built head reads.
    heads:       the built heads' global query-head indices.
    num_layer_heads: query heads in the whole layer (global).
    """

    heads: list[int]
    num_layer_heads: int
    seq_lens: torch.Tensor
    total_lens: torch.Tensor
    q: torch.Tensor | None = None
    k_cache: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    kv_heads: torch.Tensor | None = None
    scale: float = 1.0

    @property
    def batch(self) -> int:
        return int(self.seq_lens.shape[0])
