"""Several requests' prefill chunks in one launch: the layout, the packed index and its torch path.

A step's prefill chunks sit in the step's query tensor ``q [T, Hq, D]``; chunk ``r``'s queries
are rows ``q_starts[r] : q_starts[r] + q_lens[r]`` (back to back when packed, or wherever the
engine put them, with other rows in between that this launch leaves alone). ``VarlenLayout``
says, once per step and on the host, where every 64-query block of every chunk sits: its chunk,
its first row in ``q``, its number of queries and the position of its first query.
``VarlenIndex`` adds the chunks' ``SparseIndex`` ranges/columns concatenated along the block axis
(padded to a common width), so a kernel runs one program per (block, query head) and writes its
rows of ``out`` in place.

K/V come either packed contiguously (``[S_total, Hkv, D]``, chunk ``r`` at ``kv_starts[reqs[r]]``)
or from the paged cache through ``block_table [B, max_blocks]`` (chunk ``r`` reads row ``reqs[r]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .index import BLOCK_M, SparseIndex
from .prefill import sparse_prefill_paged_torch, sparse_prefill_torch


@dataclass(frozen=True)
class VarlenLayout:
    """Where each chunk's query blocks sit; host lists plus their ``[NB]`` int32 device tensors."""

    q_starts: tuple[int, ...]  # row in q of each chunk's first query
    q_lens: tuple[int, ...]
    q_offsets: tuple[int, ...]  # position of each chunk's first query (its cached prefix)
    reqs: tuple[int, ...]  # block-table row (paged) / kv_starts entry (packed) of each chunk
    block_m: int
    block_req: torch.Tensor
    block_q_start: torch.Tensor
    block_q_len: torch.Tensor
    block_pos0: torch.Tensor

    @classmethod
    def of(cls, q_lens: list[int], q_offsets: list[int], q_starts: list[int] | None = None,
           reqs: list[int] | None = None, block_m: int = BLOCK_M,
           device: torch.device | str = "cpu") -> "VarlenLayout":
        """``q_starts`` default: packed back to back; ``reqs`` default: chunk ``r`` is request ``r``."""
        if q_starts is None:
            q_starts = [sum(q_lens[:r]) for r in range(len(q_lens))]
        reqs = list(range(len(q_lens))) if reqs is None else reqs
        if not len(q_lens) == len(q_offsets) == len(q_starts) == len(reqs):
            raise ValueError(f"VarlenLayout: {len(q_lens)} q_lens, {len(q_offsets)} q_offsets, "
                             f"{len(q_starts)} q_starts and {len(reqs)} reqs; expected one of each per chunk")
        req, start, length, pos0 = [], [], [], []
        for r, (n, off, row) in enumerate(zip(q_lens, q_offsets, q_starts)):
            for b0 in range(0, n, block_m):
                req.append(reqs[r])
                start.append(row + b0)
                length.append(min(block_m, n - b0))
                pos0.append(off + b0)
        # one host -> device copy for the four block tables
        table = torch.tensor([req, start, length, pos0], dtype=torch.int32).view(4, -1).to(device)
        return cls(tuple(q_starts), tuple(q_lens), tuple(q_offsets), tuple(reqs), block_m, *table.unbind(0))

    @property
    def num_blocks(self) -> int:
        return int(self.block_req.shape[0])

    @property
    def rows_needed(self) -> int:
        """Rows ``q`` must have: one past the last chunk's last query."""
        return max((s + n for s, n in zip(self.q_starts, self.q_lens)), default=0)

    def to(self, device: torch.device | str) -> "VarlenLayout":
        dev = torch.device(device)
        if self.block_req.device == dev:
            return self
        return VarlenLayout(self.q_starts, self.q_lens, self.q_offsets, self.reqs, self.block_m,
                            self.block_req.to(dev), self.block_q_start.to(dev), self.block_q_len.to(dev),
                            self.block_pos0.to(dev))


@dataclass
class VarlenIndex:
    """Per-head ranges/columns of every chunk's query blocks, concatenated.

    range_start, range_end: ``[H, NB, R]`` int32; range_count ``[H, NB]``; columns ``[H, NB, C]``;
    column_count ``[H, NB]``. ``layout``: where the blocks sit; ``parts``: the per-chunk indices
    (the torch path runs them one by one).
    """

    range_start: torch.Tensor
    range_end: torch.Tensor
    range_count: torch.Tensor
    columns: torch.Tensor
    column_count: torch.Tensor
    layout: VarlenLayout
    parts: list[SparseIndex]

    # the layout's block tables, as the kernels read them
    block_req = property(lambda self: self.layout.block_req)
    block_q_start = property(lambda self: self.layout.block_q_start)
    block_q_len = property(lambda self: self.layout.block_q_len)
    block_pos0 = property(lambda self: self.layout.block_pos0)
    block_m = property(lambda self: self.layout.block_m)

    @property
    def cu_q(self) -> list[int]:
        """Packed query offsets ``[B + 1]`` (the rows a packed batch occupies)."""
        out = [0]
        for n in self.layout.q_lens:
            out.append(out[-1] + n)
        return out

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    @property
    def num_heads(self) -> int:
        return int(self.range_count.shape[0])

    def to_device(self, device: torch.device | str) -> "VarlenIndex":
        dev = torch.device(device)
        if self.range_count.device == dev and self.layout.block_req.device == dev:
            return self
        move = [getattr(self, n).to(dev) for n in ("range_start", "range_end", "range_count", "columns",
                                                   "column_count")]
        return VarlenIndex(*move, self.layout.to(dev), self.parts)

    @classmethod
    def pack(cls, indices: list[SparseIndex], device: torch.device | str | None = None,
             layout: VarlenLayout | None = None) -> "VarlenIndex":
        """Concatenate per-chunk indices (same heads and ``block_m``) in chunk order.

        ``layout``: where the chunks' queries sit (made once per step by the caller); default:
        packed back to back, chunk ``r`` reading request ``r``'s keys. Only tensor concatenation
        happens here, no host work per block."""
        if not indices:
            raise ValueError("VarlenIndex.pack: no chunk indices given")
        first = indices[0]
        dev = torch.device(device) if device is not None else first.device
        for i, p in enumerate(indices):
            if p.num_heads != first.num_heads or p.block_m != first.block_m:
                raise ValueError(
                    f"VarlenIndex.pack: chunk {i} has {p.num_heads} heads / block_m {p.block_m}, "
                    f"expected {first.num_heads} / {first.block_m} like chunk 0"
                )
        if layout is None:
            layout = VarlenLayout.of([p.q_len for p in indices], [p.q_offset for p in indices],
                                     block_m=first.block_m, device=dev)
        elif [(p.q_len, p.q_offset) for p in indices] != list(zip(layout.q_lens, layout.q_offsets)) \
                or layout.block_m != first.block_m:
            raise ValueError("VarlenIndex.pack: the indices' (q_len, q_offset) differ from the layout's chunks")
        r_max = max(p.range_start.shape[2] for p in indices)
        c_max = max(p.columns.shape[2] for p in indices)

        def cat(name: str, width: int | None) -> torch.Tensor:
            ts = [getattr(p, name).to(dev) for p in indices]
            if width is not None:
                ts = [torch.nn.functional.pad(t, (0, width - t.shape[2])) for t in ts]
            return ts[0].contiguous() if len(ts) == 1 else torch.cat(ts, dim=1)

        return cls(cat("range_start", r_max), cat("range_end", r_max), cat("range_count", None),
                   cat("columns", c_max), cat("column_count", None), layout.to(dev), list(indices))


def _output(q: torch.Tensor, out: torch.Tensor | None, index: VarlenIndex, name: str) -> torch.Tensor:
    if index.layout.rows_needed > q.shape[0]:
        raise ValueError(f"{name}: the layout's chunks reach row {index.layout.rows_needed}, q has {q.shape[0]} rows")
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape:
        raise ValueError(f"{name}: out has shape {tuple(out.shape)}, expected q's {tuple(q.shape)}")
    return out


def sparse_prefill_varlen_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_starts: list[int],
                                index: VarlenIndex, scale: float | None = None, return_lse: bool = False,
                                out: torch.Tensor | None = None):
    """q ``[T, Hq, D]``; k, v ``[S_total, Hkv, D]`` packed, chunk r's keys from ``kv_starts[reqs[r]]``.
    Writes the chunks' rows of ``out`` (default: a new tensor like q) and returns it (+ lse
    ``[Hq, T]`` fp32; rows outside the chunks are left as they were)."""
    out = _output(q, out, index, "sparse_prefill_varlen")
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    lay = index.layout
    for r, part in enumerate(index.parts):
        rows = slice(lay.q_starts[r], lay.q_starts[r] + lay.q_lens[r])
        k0 = kv_starts[lay.reqs[r]]
        o, l = sparse_prefill_torch(q[rows], k[k0:k0 + part.seq_len], v[k0:k0 + part.seq_len], part, scale,
                                    return_lse=True)
        out[rows] = o
        lse[:, rows] = l
    return (out, lse) if return_lse else out


def sparse_prefill_varlen_paged_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      block_table: torch.Tensor, index: VarlenIndex,
                                      scale: float | None = None, return_lse: bool = False,
                                      out: torch.Tensor | None = None):
    """Like ``sparse_prefill_varlen_torch`` with chunk r's K/V read through ``block_table[reqs[r]]``."""
    out = _output(q, out, index, "sparse_prefill_varlen_paged")
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    lay = index.layout
    for r, part in enumerate(index.parts):
        rows = slice(lay.q_starts[r], lay.q_starts[r] + lay.q_lens[r])
        o, l = sparse_prefill_paged_torch(q[rows], k_cache, v_cache, block_table[lay.reqs[r]], part, scale,
                                          return_lse=True)
        out[rows] = o
        lse[:, rows] = l
    return (out, lse) if return_lse else out
