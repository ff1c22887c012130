"""One layer's prefill index: group the heads by spec, build each group, restore head order.

The plugin calls ``build_layer_prefill_index`` once per (layer, prefill request) with the plan's
specs for the heads this rank serves. Heads with identical specs are built in one call of their
family's builder; static groups (``is_static``) can be served from a per-step ``cache`` dict, so
layers that share a static pattern share one index.
"""

from __future__ import annotations

from typing import Any

import torch

from headwise.kernels.index import BLOCK_M, SparseIndex

from . import families
from .base import PrefillInputs


def is_static(spec: Any) -> bool:
    """True when the spec's index depends only on positions (no q/k): build once per step."""
    return spec.type in families.STATIC_PREFILL


def build_prefill(spec: Any, inputs: PrefillInputs) -> SparseIndex:
    """Run one family's builder for the heads in ``inputs``."""
    return families.PREFILL[spec.type].build_prefill(spec, inputs)


def _on(index: SparseIndex, device) -> SparseIndex:
    return index if index.device == torch.device(device) else index.to(device)


class IndexCache(dict):
    """Static indices shared by layers, kept while their bytes stay within ``max_bytes``.

    The transformers path runs a long prompt chunk by chunk in every layer, so a cache for the
    whole forward would hold every chunk's index at once (at 128K, tens of MiB for a strided plan,
    more than the attention itself needs). Past the budget an index is built, used and dropped:
    the first chunks stay shared by every layer, the rest are rebuilt per layer (static patterns
    are cheap to build). ``max_bytes=None``: unbounded, like a plain dict."""

    def __init__(self, max_bytes: int | None = None):
        super().__init__()
        self.max_bytes = max_bytes
        self.bytes = 0

    def __setitem__(self, key, index: SparseIndex) -> None:
        old = self[key].nbytes if key in self else 0
        if self.max_bytes is None or self.bytes - old + index.nbytes <= self.max_bytes:
            self.bytes += index.nbytes - old
            super().__setitem__(key, index)


def _static_key(spec: Any, inp: PrefillInputs) -> tuple:
    # Head-independent patterns are the same for every head: key on the head count only.
    heads_key: Any = len(inp.heads) if spec.type in families.HEAD_INDEPENDENT else tuple(inp.global_kv_heads())
    return (spec, heads_key, inp.num_layer_heads, inp.num_layer_kv_heads, inp.q_offset, inp.q_len,
            inp.total_len, inp.block_m)


def _heads_of(q: torch.Tensor, local: list[int]) -> torch.Tensor:
    """``q[:, local]``: a view when the heads are consecutive (a whole layer's queries are not copied)."""
    if local == list(range(local[0], local[0] + len(local))):
        return q[:, local[0]:local[0] + len(local)]
    return q[:, torch.tensor(local, dtype=torch.long, device=q.device)]


def build_layer_prefill_index(
    specs: list[Any],
    heads: list[int],
    num_layer_heads: int,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    kv_heads: torch.Tensor | None,
    q_offset: int,
    total_len: int,
    block_m: int = BLOCK_M,
    *,
    q_len: int | None = None,
    num_layer_kv_heads: int | None = None,
    dense_below: int = 0,
    dense_tail: int = 0,
    scale: float | None = None,
    cache: dict | None = None,
) -> SparseIndex:
    """The ``SparseIndex`` of one request's query chunk for the heads of one layer on this rank.

    specs:    prefill spec per local query head (``plan.prefill(layer, heads[i])``).
    heads:    global query-head id per local head.
    q:        ``[Tq, H, D]`` local queries (may be None if every spec is static; then pass q_len).
    k:        ``[S, Hkv, D]`` every key of the request, prefix included (None if all static).
    kv_heads: ``[H]`` long, local KV head each local head reads (indexes k's head axis).
    q_offset: cached prefix length (position of the first query); ``S = q_offset + Tq``.
    total_len: prompt + planned generation (MoA spans).
    dense_below: a sequence shorter than this gets a dense index.
    dense_tail: blocks holding one of the chunk's last ``dense_tail`` queries keep every causal key (the
              engine passes 0 for a chunk that does not end the prompt).
    cache:    a dict kept for one scheduler step; static groups are looked up / stored in it.
    """
    if len(specs) != len(heads):
        raise ValueError(f"build_layer_prefill_index: {len(specs)} specs for {len(heads)} heads")
    if q is not None:
        q_len = q.shape[0]
    if q_len is None:
        raise ValueError("build_layer_prefill_index: pass q or q_len")
    device = q.device if q is not None else (k.device if k is not None else "cpu")
    n = len(heads)
    if q_offset + q_len < dense_below or all(s.type == "dense" for s in specs):
        return SparseIndex.dense(n, q_len, q_offset, block_m, device=device)
    if kv_heads is None:
        group = num_layer_heads // (num_layer_kv_heads or num_layer_heads)
        kv_heads = torch.tensor([h // group for h in heads], dtype=torch.long)
    kv_heads = kv_heads.long()

    groups: dict[Any, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(spec, []).append(i)
    parts, order, keys = [], [], []
    for spec, local in groups.items():
        idx = torch.tensor(local, dtype=torch.long)
        inp = PrefillInputs(
            heads=[heads[i] for i in local], num_layer_heads=num_layer_heads, q_offset=q_offset, q_len=q_len,
            total_len=total_len, q=None if q is None else _heads_of(q, local), k=k,
            kv_heads=kv_heads[idx.to(kv_heads.device)], block_m=block_m, num_layer_kv_heads=num_layer_kv_heads,
            scale=scale)
        if cache is not None and is_static(spec):
            key = _static_key(spec, inp)
            part = cache.get(key)
            if part is None:
                part = cache[key] = _on(build_prefill(spec, inp), device)  # an IndexCache may not keep it
        else:
            key, part = None, _on(build_prefill(spec, inp), device)
        parts.append(part)
        keys.append(key)
        order.extend(local)
    if len(parts) == 1:
        index = parts[0]
    else:
        inverse = torch.empty(n, dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(n)
        index = SparseIndex.cat_heads(parts).select_heads(inverse)
    if dense_tail <= 0:
        return index
    if len(parts) > 1 or keys[0] is None:
        return with_dense_tail(index, dense_tail)
    # one shared static index: its tailed copy is shared too
    tailed = ("dense_tail", keys[0], dense_tail)
    part = cache.get(tailed)
    if part is None:
        part = cache[tailed] = with_dense_tail(index, dense_tail)
    return part


def with_dense_tail(index: SparseIndex, tail: int) -> SparseIndex:
    """``index`` with every block that holds one of the chunk's last ``tail`` queries made dense."""
    # block bounds on the host (no device sync): the tail rows are the last few blocks
    first = max(0, -(-(index.seq_len - tail + 1 - index.q_offset) // index.block_m) - 1) if tail > 0 else index.num_q_blocks
    if tail <= 0 or first >= index.num_q_blocks:
        return index
    rows = slice(first, index.num_q_blocks)
    start = index.q_offset + torch.arange(index.num_q_blocks, device=index.device) * index.block_m
    end = torch.clamp(start + index.block_m, max=index.seq_len)
    rs, re = index.range_start.clone(), index.range_end.clone()
    if rs.shape[2] == 0:
        rs = torch.zeros(*rs.shape[:2], 1, dtype=rs.dtype, device=rs.device)
        re = torch.zeros_like(rs)
    rc, cc = index.range_count.clone(), index.column_count.clone()
    rs[:, rows, 0] = 0
    re[:, rows, 0] = end[rows].to(re.dtype)
    rc[:, rows] = 1
    cc[:, rows] = 0
    return SparseIndex(rs, re, rc, index.columns, cc, index.q_len, index.q_offset, index.block_m)
