"""Where the CPU prefill's rows live: the output being assembled, and query / key views.

A *row* is one query block; cells are addressed by a list of query heads and rows ``[n, k]``
(``n`` batch items of ``k`` rows each, -1 = none), shaped ``[n, S, k * bm, ...]``. When the rows
are consecutive and the heads adjacent, queries and output cells are strided views of the
caller's tensors (no copy); otherwise they are gathered / scattered by index.
"""

from __future__ import annotations

import torch


def consecutive(rows: torch.Tensor) -> int | None:
    """The first block when ``rows [n, k]`` lists consecutive blocks (so views can replace
    gathers), else None."""
    r0 = int(rows[0, 0])
    span = torch.arange(r0, r0 + rows.numel(), device=rows.device)
    return r0 if r0 >= 0 and bool((rows.reshape(-1) == span).all()) else None


def adjacent(heads: list[int]) -> bool:
    return heads == list(range(heads[0], heads[0] + len(heads)))


class Out:
    """The result being assembled: ``o [T_pad, Hq, D]`` in q's dtype (the returned output) and
    ``lse [Hq, T_pad]`` fp32. Near parts write their rows; far parts merge into them by LSE.
    Cells are addressed by heads and rows ``[n, k]`` (-1 = none), as ``[n, S, k * bm]``."""

    def __init__(self, t_pad: int, hq: int, d: int, dtype: torch.dtype, device, bm: int,
                 into: torch.Tensor | None = None):
        # ``into``: the caller's output buffer ``[t_pad, hq, d]`` (contiguous), filled in place
        self.o = into if into is not None else torch.empty(t_pad, hq, d, dtype=dtype, device=device)
        self.lse = torch.empty(hq, t_pad, device=device)
        self.bm = bm

    def _cells(self, heads: list[int], rows: torch.Tensor):
        """Views of the cells in the buffers' own layout, ``o [n, k * bm, S, D]`` and
        ``lse [S, n, k * bm]`` (consecutive rows, adjacent heads), else flat indices."""
        n, k = rows.shape
        s, m, h0 = len(heads), rows.shape[1] * self.bm, heads[0]
        r0 = consecutive(rows) if adjacent(heads) else None
        if r0 is not None:
            t0, t1 = r0 * self.bm, r0 * self.bm + n * m
            return (self.o[t0:t1, h0:h0 + s].view(n, m, s, -1), self.lse[h0:h0 + s, t0:t1].view(s, n, m)), None
        t = rows.clamp(min=0).view(n, 1, k, 1) * self.bm + torch.arange(self.bm, device=rows.device)
        h = torch.tensor(heads, device=rows.device).view(1, s, 1, 1)
        keep = (rows >= 0).view(n, 1, k, 1).expand(n, s, k, self.bm).reshape(-1)
        o_idx = (t * self.o.shape[1] + h).reshape(-1)[keep]
        l_idx = (h * self.lse.shape[1] + t).reshape(-1)[keep]
        return None, (o_idx, l_idx, keep)

    def write(self, heads: list[int], rows: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
        """o ``[n, S, k * bm, D]``, lse ``[n, S, k * bm]``: the cells' first (near) part."""
        views, idx = self._cells(heads, rows)
        if views is not None:  # iterate in the buffers' layout (the fast order for the copy)
            views[0].copy_(o.permute(0, 2, 1, 3))
            views[1].copy_(lse.permute(1, 0, 2))
            return
        o_idx, l_idx, keep = idx
        d = o.shape[-1]
        self.o.view(-1, d).index_copy_(0, o_idx, o.reshape(-1, d)[keep].to(self.o.dtype))
        self.lse.view(-1).index_copy_(0, l_idx, lse.reshape(-1)[keep].float())

    def merge(self, heads: list[int], rows: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
        """Fold another part over disjoint keys into the cells (same shapes as ``write``)."""
        views, idx = self._cells(heads, rows)
        if views is None:
            o_idx, l_idx, keep = idx
            d = o.shape[-1]
            flat_o, flat_l = self.o.view(-1, d), self.lse.view(-1)
            cur_o, cur_l = flat_o.index_select(0, o_idx), flat_l.index_select(0, l_idx)
            o, lse = o.reshape(-1, d)[keep], lse.reshape(-1)[keep]
            to_o = lambda w: w[..., None]  # noqa: E731
        else:
            cur_o, cur_l = views  # [n, m, S, D], [S, n, m]
            o, lse = o.permute(0, 2, 1, 3), lse.permute(1, 0, 2)
            to_o = lambda w: w.permute(1, 2, 0)[..., None]  # noqa: E731  [S, n, m] -> [n, m, S, 1]
        new_l = torch.logaddexp(cur_l, lse)
        safe = torch.where(torch.isinf(new_l), 0.0, new_l)
        new_o = torch.mul(cur_o, to_o(torch.exp(cur_l - safe)))  # fp32, in the buffer's layout
        new_o.addcmul_(o, to_o(torch.exp(lse - safe)))
        if views is None:
            flat_o.index_copy_(0, o_idx, new_o.to(self.o.dtype))
            flat_l.index_copy_(0, l_idx, new_l)
        else:
            cur_o.copy_(new_o)
            cur_l.copy_(new_l)

    def write_span(self, heads: list[int], o: torch.Tensor, lse: torch.Tensor) -> None:
        """o ``[S, T, D]`` / lse ``[S, T]`` for heads ``S`` at the first T query rows."""
        t = o.shape[1]
        for i, h in enumerate(heads):
            self.o[:t, h] = o[i]
            self.lse[h, :t] = lse[i]


def stack(x: torch.Tensor) -> torch.Tensor:
    """``[n, S, M, D]`` -> ``[n, 1, S * M, D]``: identical heads share one key list."""
    n, s, m, d = x.shape
    return x if s == 1 else x.reshape(n, 1, s * m, d)


def q_rows(qp: torch.Tensor, heads: list[int], rows: torch.Tensor, bm: int) -> torch.Tensor:
    """Queries of ``rows [n, k]`` (-1 -> block 0) for ``heads``: ``[n, S, k * bm, D]`` (a view
    when the rows are consecutive and the heads adjacent)."""
    nqb, d, s = qp.shape[0] // bm, qp.shape[2], len(heads)
    n, k = rows.shape
    src = qp[:, heads[0]:heads[0] + s] if adjacent(heads) else qp[:, heads]  # [T_pad, S, D]
    r0 = consecutive(rows)
    if r0 is not None:
        return src[r0 * bm:(r0 + n * k) * bm].view(n, k * bm, s, d).permute(0, 2, 1, 3)
    blocks = src.view(nqb, bm, s, d)[rows.clamp(min=0)]  # [n, k, bm, S, D]
    return blocks.permute(0, 3, 1, 2, 4).reshape(n, s, k * bm, d)


def row_steps(x: torch.Tensor) -> tuple[int, int] | None:
    """Rows (of D elements) between heads and between keys of ``x [Hkv, S, D]`` when its memory is
    one dense block of rows, head-major or key-major (``[S, Hkv, D]`` transposed); else None."""
    h, s, d = x.shape
    st_h, st_k, st_d = x.stride()
    if st_d != 1 and d > 1:
        return None
    if (h == 1 or st_h == s * d) and (s == 1 or st_k == d):
        return s, 1  # head-major
    if (h == 1 or st_h == d) and (s == 1 or st_k == h * d):
        return 1, h  # key-major
    return None


def key_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Rows of ``x [Hkv, S, D]`` as one ``[Hkv * S, D]`` view of its memory, with the row steps
    between heads and between keys: key ``j`` of head ``g`` is row ``g * head_step + j * key_step``."""
    steps = row_steps(x)
    if steps is None:
        raise ValueError(f"key_rows: expected [Hkv, S, D] laid out head-major or key-major, found strides "
                         f"{x.stride()} for shape {tuple(x.shape)}")
    h, s, d = x.shape
    return x.as_strided((h * s, d), (d, 1), x.storage_offset()), *steps


def windows(x: torch.Tensor, g: int, first: int, count: int, width: int, step: int) -> torch.Tensor:
    """``count`` overlapping windows of ``width`` keys of KV head ``g``, the i-th starting at
    ``first + i * step``: a strided view ``[count, 1, width, D]`` of ``x [Hkv, S, D]`` (any layout
    with unit stride along D). Windows reaching past the last key (the partial last query block)
    read a zero-padded copy of just the keys they span, so the caller never pads the whole cache."""
    s, d = x.shape[1], x.shape[2]
    span = (count - 1) * step + width
    if first < 0 or first + span > s:
        src = x.new_zeros(1, span, d)
        lo, hi = max(first, 0), min(first + span, s)
        if hi > lo:
            src[0, lo - first:hi - first] = x[g, lo:hi]
        x, g, first = src, 0, 0
    steps = row_steps(x)
    if steps is None:
        raise ValueError(f"windows: expected [Hkv, S, D] laid out head-major or key-major, found strides {x.stride()}")
    st_h, st_k = steps[0] * d, steps[1] * d
    return x.as_strided((count, 1, width, d), (step * st_k, 0, st_k, 1), x.storage_offset() + g * st_h + first * st_k)
