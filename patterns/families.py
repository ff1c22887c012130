"""Which module implements each pattern type, for prefill and for decode.

A family module offers some of: ``build_prefill(spec, PrefillInputs) -> SparseIndex``,
``select_decode(spec, DecodeInputs) -> DecodeSelection``, ``expected_density(spec, length, ctx)``,
``expected_decode_density(spec, length, ctx)``.
"""

from __future__ import annotations

from types import ModuleType

from . import (a_shape, block_sparse, dense, elastic_window, hierarchical, hierarchical_decode, page_topk, strided, tidal,
               vertical_slash, window)

PREFILL: dict[str, ModuleType] = {
    "dense": dense,
    "a_shape": a_shape,
    "vertical_slash": vertical_slash,
    "block_sparse": block_sparse,
    "strided": strided,
    "elastic_window": elastic_window,
    "hierarchical": hierarchical,
}

DECODE: dict[str, ModuleType] = {
    "dense": dense,
    "window": window,
    "elastic_window": elastic_window,
    "tidal": tidal,
    "page_topk": page_topk,
    "strided": strided,
    "hierarchical": hierarchical_decode,  # HiP's refreshed decode mask builds on the prefill stages
}

# Prefill patterns whose index depends only on positions: built once per step, shared by layers.
STATIC_PREFILL = frozenset({"dense", "a_shape", "strided", "elastic_window"})
# Of those, the ones whose index is the same for every head (strided shifts per KV head).
HEAD_INDEPENDENT = frozenset({"dense", "a_shape", "elastic_window"})
# Decode patterns whose selection may hold BLOCKS rows (the others select tokens or a window).
DECODE_BLOCKS = frozenset({"page_topk", "strided"})
