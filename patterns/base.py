"""What every pattern family receives: the inputs of one layer's index building.

A pattern family is one module in ``headwise.patterns`` with its pydantic parameter model(s), a
prefill index builder and/or a decode selector, and its expected density. The builders receive
the heads of one layer that share the same parameters, so identical heads are built together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict


class PatternModel(BaseModel):
    """Base of every pattern family's parameter model.

    Frozen, so specs are hashable: a layer's heads are grouped by spec, and static indices are
    cached by spec. Extra fields are refused so a typo (``"windw"``) is an error, not a default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class PrefillInputs:
    """One request's query chunk, for the heads of one layer that share a pattern.

    q:          ``[Tq, H, D]`` queries of those heads (None when the pattern is static).
    k:          ``[S, Hkv, D]`` every key of the request, prefix included (None when static).
    kv_heads:   ``[H]`` long, the KV head each built head reads (GQA: ``head // group``).
    heads:      the built heads' indices among the layer's *global* query heads (S2 strides
                and per-head parameters depend on them).
    num_layer_heads: query heads in the whole layer (global, before tensor parallelism).
    num_layer_kv_heads: KV heads in the whole layer (global); None means one per query head.
                S2 strides are defined per *global* KV head, so a TP rank needs this to agree
                with the other ranks.
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
    num_layer_kv_heads: int | None = None
    scale: float | None = None  # softmax scale for estimation; None means 1/sqrt(D)

    @property
    def seq_len(self) -> int:
        return self.q_offset + self.q_len

    def global_kv_heads(self) -> list[int]:
        """The global KV head of every built head (GQA group = layer heads // layer KV heads)."""
        group = self.num_layer_heads // (self.num_layer_kv_heads or self.num_layer_heads)
        return [h // group for h in self.heads]


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
    num_layer_kv_heads: KV heads in the whole layer (global); None means one per query head.
    max_seq_len: a bound on ``seq_lens`` known on the host (the engine's max model length):
                 selections are padded to it instead of reading ``seq_lens`` back (no sync).
    page_summaries: Quest's per-page key min/max kept beside the cache (``PageSummaries``);
                 None means page_topk recomputes them from the cache.
    hip_state / step: HiP decode's persistent mask (``HipDecodeState``) and the decode step
                 number that decides which stages refresh; None means every stage runs.
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
    num_layer_kv_heads: int | None = None
    max_seq_len: int | None = None
    page_summaries: object | None = None
    hip_state: object | None = None
    slots: torch.Tensor | None = None  # [B] persistent state row of each request (HiP decode)
    step: int = 0

    @property
    def batch(self) -> int:
        return int(self.seq_lens.shape[0])

    def global_kv_heads(self) -> list[int]:
        group = self.num_layer_heads // (self.num_layer_kv_heads or self.num_layer_heads)
        return [h // group for h in self.heads]


@dataclass(frozen=True)
class DensityContext:
    """What an expected-density estimate needs besides the pattern and the length.

    planned_generation: new tokens assumed after the prompt (MoA spans grow with total length).
    tidal_top_k:        TidalDecode token budget when a ``tidal`` spec does not set its own.
    num_layer_heads / num_layer_kv_heads: the layer's global head counts (S2 strides per head).
    block_m:            queries per prefill index block.
    """

    planned_generation: int = 0
    tidal_top_k: int = 256
    num_layer_heads: int = 1
    num_layer_kv_heads: int | None = None
    block_m: int = 64
