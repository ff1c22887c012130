"""The two index formats every headwise kernel consumes.

``SparseIndex`` (prefill): for each (query head, block of ``block_m`` queries) a sorted list of
disjoint key *ranges* ``[start, end)`` and a sorted list of extra key *columns* that lie outside
every range of that block. Positions are absolute token positions in the request's sequence.
Query ``i`` of the chunk sits at position ``q_offset + i``; causality (key <= query position) is
always applied on top of the index by every kernel, so a range may end past a block's first query.

``DecodeSelection`` (decode): for each (request, head) a mode and its data:
``DENSE`` (every cached token), ``WINDOW`` (the first ``sink`` tokens and the last ``window``
tokens), ``POSITIONS`` (an explicit list of token positions) or ``BLOCKS`` (an explicit list of
logical KV blocks of ``block_size`` tokens). The head axis has either one entry per query head or
one per KV head; in the second case the heads of a GQA group share it.

Both formats are padded tensors (``int32``), so kernels read them without host work, and both can
expand themselves into the exact boolean mask they stand for (``to_dense_mask``), which is what
tests compare every kernel against.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

BLOCK_M = 64  # queries per prefill block; the unit every prefill index is built in


def _as_i32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int32 else x.to(torch.int32)


@dataclass
class SparseIndex:
    """Key ranges and key columns per (query head, query block) of one request's query chunk.

    range_start, range_end: ``[H, NQB, R]`` int32, valid where ``r < range_count``; sorted, disjoint.
    range_count:            ``[H, NQB]`` int32.
    columns:                ``[H, NQB, C]`` int32, valid where ``c < column_count``; sorted, unique,
                            outside every range of the same block.
    column_count:           ``[H, NQB]`` int32.
    q_len:     queries in the chunk; ``NQB = ceil(q_len / block_m)``.
    q_offset:  position of the chunk's first query (the cached prefix length).
    """

    range_start: torch.Tensor
    range_end: torch.Tensor
    range_count: torch.Tensor
    columns: torch.Tensor
    column_count: torch.Tensor
    q_len: int
    q_offset: int = 0
    block_m: int = BLOCK_M

    def __post_init__(self) -> None:
        self.range_start = _as_i32(self.range_start)
        self.range_end = _as_i32(self.range_end)
        self.range_count = _as_i32(self.range_count)
        self.columns = _as_i32(self.columns)
        self.column_count = _as_i32(self.column_count)
        h, nqb = self.range_count.shape
        if nqb != self.num_q_blocks:
            raise ValueError(
                f"SparseIndex: range_count has {nqb} query blocks, expected "
                f"ceil({self.q_len} / {self.block_m}) = {self.num_q_blocks}"
            )
        for name in ("range_start", "range_end", "columns"):
            t = getattr(self, name)
            if t.dim() != 3 or tuple(t.shape[:2]) != (h, nqb):
                raise ValueError(f"SparseIndex: {name} has shape {tuple(t.shape)}, expected [{h}, {nqb}, *]")
        if self.range_start.shape != self.range_end.shape:
            raise ValueError("SparseIndex: range_start and range_end differ in shape")
        if tuple(self.column_count.shape) != (h, nqb):
            raise ValueError(f"SparseIndex: column_count has shape {tuple(self.column_count.shape)}, expected [{h}, {nqb}]")

    # ------------------------------------------------------------------ shape
    @property
    def num_heads(self) -> int:
        return self.range_count.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_m)

    @property
    def seq_len(self) -> int:
        """Length of the sequence the chunk attends to (prefix + chunk)."""
        return self.q_offset + self.q_len

    @property
    def nbytes(self) -> int:
        """Bytes its tensors hold."""
        return sum(t.numel() * t.element_size()
                   for t in (self.range_start, self.range_end, self.range_count, self.columns, self.column_count))

    @property
    def device(self) -> torch.device:
        return self.range_count.device

    def to(self, device: torch.device | str) -> "SparseIndex":
        return SparseIndex(
            self.range_start.to(device), self.range_end.to(device), self.range_count.to(device),
            self.columns.to(device), self.column_count.to(device), self.q_len, self.q_offset, self.block_m,
        )

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_lists(
        cls,
        ranges: list[list[list[tuple[int, int]]]],
        columns: list[list[list[int]]],
        q_len: int,
        q_offset: int = 0,
        block_m: int = BLOCK_M,
        device: torch.device | str = "cpu",
    ) -> "SparseIndex":
        """Build from nested Python lists ``ranges[h][qb] = [(start, end), ...]``, ``columns[h][qb]``.

        Ranges are sorted and merged, columns sorted, de-duplicated and dropped where a range
        covers them, so callers may pass overlapping pieces.
        """
        h = len(ranges)
        nqb = -(-q_len // block_m)
        norm_r: list[list[list[tuple[int, int]]]] = []
        norm_c: list[list[list[int]]] = []
        for hh in range(h):
            rows_r, rows_c = [], []
            for qb in range(nqb):
                merged: list[list[int]] = []
                for s, e in sorted((int(s), int(e)) for s, e in ranges[hh][qb] if e > s):
                    if merged and s <= merged[-1][1]:
                        merged[-1][1] = max(merged[-1][1], e)
                    else:
                        merged.append([s, e])
                cols = sorted({int(c) for c in columns[hh][qb]})
                cols = [c for c in cols if not any(s <= c < e for s, e in merged)]
                rows_r.append([(s, e) for s, e in merged])
                rows_c.append(cols)
            norm_r.append(rows_r)
            norm_c.append(rows_c)
        r_max = max([1] + [len(r) for hr in norm_r for r in hr])
        c_max = max([1] + [len(c) for hc in norm_c for c in hc])
        rs = torch.zeros(h, nqb, r_max, dtype=torch.int32)
        re = torch.zeros(h, nqb, r_max, dtype=torch.int32)
        rc = torch.zeros(h, nqb, dtype=torch.int32)
        cs = torch.zeros(h, nqb, c_max, dtype=torch.int32)
        cc = torch.zeros(h, nqb, dtype=torch.int32)
        for hh in range(h):
            for qb in range(nqb):
                for i, (s, e) in enumerate(norm_r[hh][qb]):
                    rs[hh, qb, i], re[hh, qb, i] = s, e
                rc[hh, qb] = len(norm_r[hh][qb])
                for i, c in enumerate(norm_c[hh][qb]):
                    cs[hh, qb, i] = c
                cc[hh, qb] = len(norm_c[hh][qb])
        return cls(rs.to(device), re.to(device), rc.to(device), cs.to(device), cc.to(device), q_len, q_offset, block_m)

    @classmethod
    def dense(cls, num_heads: int, q_len: int, q_offset: int = 0, block_m: int = BLOCK_M,
              device: torch.device | str = "cpu") -> "SparseIndex":
        """Causal dense attention: one range ``[0, block_end)`` per block."""
        nqb = -(-q_len // block_m)
        ends = torch.clamp(torch.arange(1, nqb + 1, device=device) * block_m, max=q_len) + q_offset
        re = ends.view(1, nqb, 1).expand(num_heads, nqb, 1).contiguous()
        zeros3 = torch.zeros(num_heads, nqb, 1, dtype=torch.int32, device=device)
        ones = torch.ones(num_heads, nqb, dtype=torch.int32, device=device)
        return cls(zeros3, re, ones, zeros3.clone(), torch.zeros_like(ones), q_len, q_offset, block_m)

    @staticmethod
    def cat_heads(parts: list["SparseIndex"]) -> "SparseIndex":
        """Stack indices of disjoint head groups (in the given order) into one index."""
        first = parts[0]
        for p in parts:
            if (p.q_len, p.q_offset, p.block_m) != (first.q_len, first.q_offset, first.block_m):
                raise ValueError("SparseIndex.cat_heads: parts describe different query chunks")
        r_max = max(p.range_start.shape[2] for p in parts)
        c_max = max(p.columns.shape[2] for p in parts)

        def pad(t: torch.Tensor, n: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, n - t.shape[2]))

        return SparseIndex(
            torch.cat([pad(p.range_start, r_max) for p in parts]),
            torch.cat([pad(p.range_end, r_max) for p in parts]),
            torch.cat([p.range_count for p in parts]),
            torch.cat([pad(p.columns, c_max) for p in parts]),
            torch.cat([p.column_count for p in parts]),
            first.q_len, first.q_offset, first.block_m,
        )

    def select_heads(self, heads: torch.Tensor | list[int]) -> "SparseIndex":
        heads = torch.as_tensor(heads, dtype=torch.long, device=self.device)
        return SparseIndex(
            self.range_start[heads], self.range_end[heads], self.range_count[heads],
            self.columns[heads], self.column_count[heads], self.q_len, self.q_offset, self.block_m,
        )

    # ------------------------------------------------------------- semantics
    def to_dense_mask(self) -> torch.Tensor:
        """The exact boolean mask ``[H, q_len, seq_len]`` this index stands for, causality included."""
        h, nqb = self.num_heads, self.num_q_blocks
        s = self.seq_len
        dev = self.device
        keys = torch.arange(s, device=dev)
        # [H, NQB, R, S]: key inside range r of block qb
        r_valid = torch.arange(self.range_start.shape[2], device=dev) < self.range_count[..., None]
        in_range = (keys >= self.range_start[..., None]) & (keys < self.range_end[..., None]) & r_valid[..., None]
        block_mask = in_range.any(dim=2)  # [H, NQB, S]
        c_valid = torch.arange(self.columns.shape[2], device=dev) < self.column_count[..., None]
        cols = torch.where(c_valid, self.columns.long(), torch.full_like(self.columns.long(), s))
        col_mask = torch.zeros(h, nqb, s + 1, dtype=torch.bool, device=dev)
        col_mask.scatter_(2, cols.clamp(max=s), True)
        block_mask |= col_mask[..., :s]
        mask = block_mask.repeat_interleave(self.block_m, dim=1)[:, : self.q_len]  # [H, Tq, S]
        q_pos = self.q_offset + torch.arange(self.q_len, device=dev)
        return mask & (keys[None, None, :] <= q_pos[None, :, None])

    def keys_per_query(self) -> torch.Tensor:
        """``[H, q_len]`` number of keys each query attends to (causality applied), without an S×S mask."""
        dev = self.device
        q_pos = (self.q_offset + torch.arange(self.q_len, device=dev)).view(1, -1, 1)  # [1, Tq, 1]
        qb = torch.arange(self.q_len, device=dev) // self.block_m
        rs = self.range_start[:, qb].long()  # [H, Tq, R]
        re = self.range_end[:, qb].long()
        r_valid = torch.arange(rs.shape[2], device=dev) < self.range_count[:, qb, None]
        in_ranges = ((torch.minimum(re, q_pos + 1) - rs).clamp(min=0) * r_valid).sum(-1)
        cs = self.columns[:, qb].long()
        c_valid = torch.arange(cs.shape[2], device=dev) < self.column_count[:, qb, None]
        in_cols = ((cs <= q_pos) & c_valid).sum(-1)
        return in_ranges + in_cols

    def density(self) -> float:
        """Fraction of the causal (query, key) pairs this index keeps."""
        kept = self.keys_per_query().sum().item()
        q_pos = self.q_offset + torch.arange(self.q_len)
        causal = (q_pos + 1).sum().item() * self.num_heads
        return kept / causal if causal else 0.0

    def check(self) -> None:
        """Raise ``ValueError`` if the invariants of the format do not hold."""
        s = self.seq_len
        r_valid = torch.arange(self.range_start.shape[2], device=self.device) < self.range_count[..., None]
        rs, re = self.range_start.long(), self.range_end.long()
        if bool(((rs < 0) | (re > s) | (re <= rs))[r_valid].any()):
            raise ValueError(f"SparseIndex: a range is empty or outside [0, {s})")
        both = r_valid[..., 1:] & r_valid[..., :-1]
        if bool((rs[..., 1:] <= re[..., :-1])[both].any()):
            raise ValueError("SparseIndex: ranges of a block are not sorted and disjoint (touching ranges must be merged)")
        c_valid = torch.arange(self.columns.shape[2], device=self.device) < self.column_count[..., None]
        cs = self.columns.long()
        if bool(((cs < 0) | (cs >= s))[c_valid].any()):
            raise ValueError(f"SparseIndex: a column is outside [0, {s})")
        cboth = c_valid[..., 1:] & c_valid[..., :-1]
        if bool((cs[..., 1:] <= cs[..., :-1])[cboth].any()):
            raise ValueError("SparseIndex: columns of a block are not sorted and unique")
        inside = (cs[..., :, None] >= rs[..., None, :]) & (cs[..., :, None] < re[..., None, :])
        inside &= c_valid[..., :, None] & r_valid[..., None, :]
        if bool(inside.any()):
            raise ValueError("SparseIndex: a column lies inside a range of the same block")


class DecodeMode(enum.IntEnum):
    DENSE = 0  # every cached token
    WINDOW = 1  # tokens [0, sink) and [len - window, len)
    POSITIONS = 2  # indices holds token positions
    BLOCKS = 3  # indices holds logical KV block numbers of block_size tokens


@dataclass
class DecodeSelection:
    """Which cached tokens each (request, head) attends to during one decode step.

    mode:    ``[B, H]`` int32, a ``DecodeMode`` per (request, head).
    sink:    ``[B, H]`` int32 (WINDOW).
    window:  ``[B, H]`` int32 (WINDOW); the current token is always inside the window.
    indices: ``[B, H, K]`` int32, valid where ``k < count`` (POSITIONS, BLOCKS); sorted, unique.
    count:   ``[B, H]`` int32.
    block_size: tokens per logical block for BLOCKS.
    H is the number of query heads, or the number of KV heads when a GQA group shares a selection.
    """

    mode: torch.Tensor
    sink: torch.Tensor
    window: torch.Tensor
    indices: torch.Tensor
    count: torch.Tensor
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("mode", "sink", "window", "indices", "count"):
            setattr(self, name, _as_i32(getattr(self, name)))
        b, h = self.mode.shape
        for name in ("sink", "window", "count"):
            if tuple(getattr(self, name).shape) != (b, h):
                raise ValueError(f"DecodeSelection: {name} has shape {tuple(getattr(self, name).shape)}, expected [{b}, {h}]")
        if self.indices.dim() != 3 or tuple(self.indices.shape[:2]) != (b, h):
            raise ValueError(f"DecodeSelection: indices has shape {tuple(self.indices.shape)}, expected [{b}, {h}, K]")

    @property
    def batch(self) -> int:
        return self.mode.shape[0]

    @property
    def num_heads(self) -> int:
        return self.mode.shape[1]

    @property
    def device(self) -> torch.device:
        return self.mode.device

    @classmethod
    def uniform(cls, batch: int, heads: int, mode: DecodeMode, sink: int = 0, window: int = 0,
                indices: torch.Tensor | None = None, count: torch.Tensor | None = None,
                block_size: int = 16, device: torch.device | str = "cpu") -> "DecodeSelection":
        full = lambda v: torch.full((batch, heads), v, dtype=torch.int32, device=device)  # noqa: E731
        if indices is None:
            indices = torch.zeros(batch, heads, 1, dtype=torch.int32, device=device)
            count = full(0)
        elif count is None:
            count = full(indices.shape[2])
        return cls(full(int(mode)), full(sink), full(window), indices, count, block_size)

    def to(self, device: torch.device | str) -> "DecodeSelection":
        return DecodeSelection(self.mode.to(device), self.sink.to(device), self.window.to(device),
                               self.indices.to(device), self.count.to(device), self.block_size)

    def to_dense_mask(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """``[B, H, max(seq_lens)]`` bool: the cached positions each (request, head) attends to."""
        dev = self.device
        seq_lens = seq_lens.to(dev).long()
        s = int(seq_lens.max().item()) if seq_lens.numel() else 0
        pos = torch.arange(s, device=dev).view(1, 1, s)
        length = seq_lens.view(-1, 1, 1)
        valid = pos < length
        mode = self.mode[..., None]
        window = (pos < self.sink[..., None]) | (pos >= length - self.window[..., None])
        k_valid = torch.arange(self.indices.shape[2], device=dev) < self.count[..., None]
        idx = self.indices.long()
        if self.indices.shape[2] and s:
            hit_pos = torch.zeros(*self.mode.shape, s + 1, dtype=torch.bool, device=dev)
            hit_pos.scatter_(2, torch.where(k_valid, idx, s).clamp(0, s), True)
            nblk = -(-s // self.block_size)
            hit_blk = torch.zeros(*self.mode.shape, nblk + 1, dtype=torch.bool, device=dev)
            hit_blk.scatter_(2, torch.where(k_valid, idx, nblk).clamp(0, nblk), True)
            listed = hit_pos[..., :s]
            in_block = hit_blk[..., (torch.arange(s, device=dev) // self.block_size)]
        else:
            listed = in_block = torch.zeros(*self.mode.shape, s, dtype=torch.bool, device=dev)
        mask = torch.where(mode == DecodeMode.DENSE, torch.ones_like(window),
                           torch.where(mode == DecodeMode.WINDOW, window,
                                       torch.where(mode == DecodeMode.POSITIONS, listed, in_block)))
        return mask & valid

    def tokens_selected(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` number of cached tokens each (request, head) reads."""
        return self.to_dense_mask(seq_lens).sum(-1)
