"""Several requests' prefill chunks in one launch: the packed index and its torch path.

A batch of prefills packs its queries back to back, ``q [T_total, Hq, D]`` with request ``r``'s
rows at ``cu_q[r]:cu_q[r+1]``. ``VarlenIndex.pack`` concatenates the requests' ``SparseIndex``
along the query-block axis (padding ranges/columns to a common width) and adds, per global block,
the request it belongs to, its first packed query row, its number of queries and the absolute
position of its first query. A kernel then runs one program per (global block, query head).

K/V come either packed contiguously (``[S_total, Hkv, D]``, request ``r`` at ``kv_starts[r]``)
or from the paged cache through ``block_table [B, max_blocks]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .index import SparseIndex
from .prefill import sparse_prefill_paged_torch, sparse_prefill_torch


@dataclass
class VarlenIndex:
    """Per-head ranges/columns of every request's query blocks, concatenated.

    range_start, range_end: ``[H, NB, R]`` int32; range_count ``[H, NB]``; columns ``[H, NB, C]``;
    column_count ``[H, NB]``. block_req, block_q_start, block_q_len, block_pos0: ``[NB]`` int32.
    parts: the per-request indices (for the torch path); cu_q: packed query offsets ``[B + 1]``.
    """

    range_start: torch.Tensor
    range_end: torch.Tensor
    range_count: torch.Tensor
    columns: torch.Tensor
    column_count: torch.Tensor
    block_req: torch.Tensor
    block_q_start: torch.Tensor
    block_q_len: torch.Tensor
    block_pos0: torch.Tensor
    parts: list[SparseIndex]
    cu_q: list[int]
    block_m: int

    @property
    def num_blocks(self) -> int:
        return int(self.block_req.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.range_count.shape[0])

    def to_device(self, device: torch.device | str) -> "VarlenIndex":
        dev = torch.device(device)
        if self.block_req.device == dev:
            return self
        move = [getattr(self, n).to(dev) for n in ("range_start", "range_end", "range_count", "columns",
                                                   "column_count", "block_req", "block_q_start",
                                                   "block_q_len", "block_pos0")]
        return VarlenIndex(*move, self.parts, self.cu_q, self.block_m)

    @classmethod
    def pack(cls, indices: list[SparseIndex], device: torch.device | str | None = None) -> "VarlenIndex":
        """Concatenate per-request indices (same heads and ``block_m``) in request order."""
        if not indices:
            raise ValueError("VarlenIndex.pack: no request indices given")
        first = indices[0]
        dev = torch.device(device) if device is not None else first.device
        for i, p in enumerate(indices):
            if p.num_heads != first.num_heads or p.block_m != first.block_m:
                raise ValueError(
                    f"VarlenIndex.pack: request {i} has {p.num_heads} heads / block_m {p.block_m}, "
                    f"expected {first.num_heads} / {first.block_m} like request 0"
                )
        r_max = max(p.range_start.shape[2] for p in indices)
        c_max = max(p.columns.shape[2] for p in indices)

        def cat(name: str, width: int | None) -> torch.Tensor:
            ts = [getattr(p, name).to(dev) for p in indices]
            if width is not None:
                ts = [torch.nn.functional.pad(t, (0, width - t.shape[2])) for t in ts]
            return torch.cat(ts, dim=1).contiguous()

        cu_q, req, q_start, q_len, pos0 = [0], [], [], [], []
        bm = first.block_m
        for r, p in enumerate(indices):
            for qb in range(p.num_q_blocks):
                req.append(r)
                q_start.append(cu_q[-1] + qb * bm)
                q_len.append(min(bm, p.q_len - qb * bm))
                pos0.append(p.q_offset + qb * bm)
            cu_q.append(cu_q[-1] + p.q_len)
        as_t = lambda xs: torch.tensor(xs, dtype=torch.int32).to(dev)  # noqa: E731
        return cls(cat("range_start", r_max), cat("range_end", r_max), cat("range_count", None),
                   cat("columns", c_max), cat("column_count", None),
                   as_t(req), as_t(q_start), as_t(q_len), as_t(pos0), list(indices), cu_q, bm)


def sparse_prefill_varlen_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_starts: list[int],
                                index: VarlenIndex, scale: float | None = None, return_lse: bool = False):
    """q ``[T_total, Hq, D]``; k, v ``[S_total, Hkv, D]`` packed, request r from ``kv_starts[r]``.
    Returns out ``[T_total, Hq, D]`` (+ lse ``[Hq, T_total]`` fp32)."""
    outs, lses = [], []
    for r, part in enumerate(index.parts):
        sl = slice(index.cu_q[r], index.cu_q[r + 1])
        ks = slice(kv_starts[r], kv_starts[r] + part.seq_len)
        o, l = sparse_prefill_torch(q[sl], k[ks], v[ks], part, scale, return_lse=True)
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs)
    return (out, torch.cat(lses, dim=1)) if return_lse else out


def sparse_prefill_varlen_paged_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      block_table: torch.Tensor, index: VarlenIndex,
                                      scale: float | None = None, return_lse: bool = False):
    """Like ``sparse_prefill_varlen_torch`` with request r's K/V read through ``block_table[r]``."""
    outs, lses = [], []
    for r, part in enumerate(index.parts):
        sl = slice(index.cu_q[r], index.cu_q[r + 1])
        o, l = sparse_prefill_paged_torch(q[sl], k_cache, v_cache, block_table[r], part, scale, return_lse=True)
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs)
    return (out, torch.cat(lses, dim=1)) if return_lse else out
