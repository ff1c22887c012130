"""Sparse prefill attention over a ``SparseIndex``: the torch path (CPU, and the test oracle).

``prefill_plan`` classifies the rows (query blocks) of each set of identical heads; this module
runs them with torch's fused CPU flash kernel and merges partial results by their log-sum-exp:

* dense prefix rows: one dense causal call over the leading blocks (a whole dense head too);
* near part: regular rows read their band ``[bs - b, be)`` as overlapping windows of the K/V
  buffer (a strided view, no copy), a chunk of blocks per batch item under one relative mask
  shared by every item; short rows read their diagonal block (causal, no mask); broken rows read
  it under a membership mask;
* far part (``prefill_far.py``, merged into the near part): the keys below the near window. When
  every row sees a prefix of one key list (sinks, vertical columns, strided shards), that list is
  gathered once and runs of rows share a call under prefix masks; otherwise each row's keys are
  gathered.

Heads of one KV group are stacked along the query axis wherever their work coincides (identical
indices, or just the same dense prefix / band width), so the kernel sees more queries per key list
and each K/V row is read once per group: K/V are never repeated per query head. Memory stays
O(S x block) apart from the output-sized result.

The Triton kernels (``prefill_triton.py``) implement the same contract; ``sparse_prefill`` and
``sparse_prefill_paged`` (in ``dispatch.py``) choose between them.
"""

from __future__ import annotations

import math

import torch

from . import prefill_plan
from .attention_torch import dense_attention_lse, flash, fused_cpu_ok
from .index import SparseIndex
from .prefill_far import far
from .prefill_io import Out, q_rows, row_steps, stack, windows
from .prefill_plan import (BIG, HeadPlan, band_chunk, block_bounds, head_sets, in_ranges, own_range, plan_heads,
                           row_tensors)

_NEG_INF = float("-inf")


def _band_bias(band: int, m: int, bm: int, stacked: int, dtype, device) -> torch.Tensor:
    """Relative mask of a chunk of ``m`` queries over keys ``[cs - band, cs + m)``: query i (block
    i // bm) sees key r from its block's band start to itself. ``[1, 1, stacked * m, band + m]``."""
    i = torch.arange(m, device=device).repeat(stacked)[:, None]  # heads stacked: the same rows again
    r = torch.arange(band + m, device=device)[None, :]
    bias = torch.zeros(stacked * m, band + m, dtype=dtype, device=device)
    bias.masked_fill_(r < (i // bm) * bm, _NEG_INF)  # before the block's band (one bool temporary at a time)
    return bias.masked_fill_(r > band + i, _NEG_INF)[None, None]  # after the query itself


def _runs(rows: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs ``[first, last + 1)`` of consecutive block numbers in sorted ``rows``."""
    if rows.numel() == 0:
        return []
    cut = (torch.nonzero(torch.diff(rows) != 1).view(-1) + 1).tolist()
    bounds = [0] + cut + [rows.numel()]
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:])]


def _near_band(acc: Out, qp, kh, vh, index: SparseIndex, plans: list[HeadPlan], scale: float) -> None:
    """Regular rows: the band ``[bs - b, be)`` of every block, causal, read as strided windows.
    ``plans`` share a KV head and a band width, so the rows regular in all of them run with
    every head stacked (more queries per key list); the others run per plan."""
    common = plans[0].regular.clone()
    for p in plans[1:]:
        common &= p.regular
    heads = sorted(h for p in plans for h in p.heads)
    bm, b, s, g = index.block_m, plans[0].band, len(heads), plans[0].kv_head
    rows = torch.nonzero(common).view(-1)
    k = band_chunk(b, rows.numel(), s, bm, prefill_plan.PAIR_BUDGET)
    leftover: list[int] = []
    for r0, r1 in _runs(rows):
        n_items = (r1 - r0) // k
        if k == 1 or n_items == 0:
            leftover.extend(range(r0, r1))
            continue
        leftover.extend(range(r0 + n_items * k, r1))
        m = k * bm
        bias = _band_bias(b, m, bm, s, qp.dtype, qp.device)
        per_call = max(1, prefill_plan.PAIR_BUDGET // (s * m * (b + m)))
        for i0 in range(0, n_items, per_call):
            n = min(per_call, n_items - i0)
            c0 = r0 + i0 * k  # first block of the call
            first = index.q_offset + c0 * bm - b
            items = torch.arange(c0, c0 + n * k, device=qp.device).view(n, k)
            o, l = flash(stack(q_rows(qp, heads, items, bm)),
                         windows(kh, g, first, n, b + m, m), windows(vh, g, first, n, b + m, m), bias, scale=scale)
            acc.write(heads, items, o.view(n, s, m, -1), l.reshape(n, s, m))
    if leftover:
        _near_rows(acc, qp, kh, vh, index, heads, g, torch.tensor(leftover, device=qp.device), b, scale)
    for p in plans:
        own = torch.nonzero(p.regular & ~common).view(-1)
        if own.numel():
            _near_rows(acc, qp, kh, vh, index, p.heads, g, own, b, scale)


def _near_rows(acc: Out, qp, kh, vh, index: SparseIndex, heads: list[int], g: int, rows: torch.Tensor, b: int,
               scale: float, bias: torch.Tensor | None = None) -> None:
    """Rows (a 1-d tensor of blocks) over their windows ``[bs - b, bs + bm)``, one block per item:
    with the shared band mask, or causal when ``b`` is 0, or under a per-row ``bias [n, 1, bm, bm]``."""
    bm, s = index.block_m, len(heads)
    per = max(1, prefill_plan.QUERY_BUDGET // (s * bm))  # rows per call: bounds the call's query copy and output
    if rows.numel() > per:
        for i in range(0, rows.numel(), per):
            _near_rows(acc, qp, kh, vh, index, heads, g, rows[i:i + per], b, scale,
                       None if bias is None else bias[i:i + per])
        return
    first_row = int(rows.min())
    span = int(rows.max()) - first_row + 1
    first = index.q_offset + first_row * bm - b
    kw = windows(kh, g, first, span, b + bm, bm)
    vw = windows(vh, g, first, span, b + bm, bm)
    if span != rows.numel():  # not consecutive: gather the windows (few rows)
        kw, vw = kw[rows - first_row], vw[rows - first_row]
    q = q_rows(qp, heads, rows[:, None], bm)  # [n, S, bm, D]
    n = rows.numel()
    if bias is None and b == 0:  # diagonal block only: the kernel's own causal mask
        o, l = flash(q, kw.expand(n, s, bm, -1), vw.expand(n, s, bm, -1), causal=True, scale=scale)
    else:
        if bias is None:
            bias = _band_bias(b, bm, bm, s, qp.dtype, qp.device)
        elif s > 1:
            bias = bias.repeat(1, 1, s, 1)
        o, l = flash(stack(q), kw, vw, bias, scale=scale)
    acc.write(heads, rows[:, None], o.view(n, s, bm, -1), l.reshape(n, s, bm))


def _near_diag(acc: Out, qp, kh, vh, index: SparseIndex, p: HeadPlan, scale: float) -> None:
    """Short rows: the diagonal block, causal. Broken rows: the diagonal block under the index."""
    short = torch.nonzero(p.short).view(-1)
    if short.numel():
        _near_rows(acc, qp, kh, vh, index, p.heads, p.kv_head, short, 0, scale)
    broken = torch.nonzero(p.broken).view(-1)
    if broken.numel() == 0:
        return
    bm = index.block_m
    bs, _ = block_bounds(index)
    pos = bs[broken, None] + torch.arange(bm, device=qp.device)  # [n, bm] the block's own positions
    rs, re, rc, cs, cc = row_tensors(index, p.heads[0], broken)
    member = in_ranges(pos, rs, re, rc)
    c_ok = torch.where(torch.arange(cs.shape[1], device=cs.device) < cc[:, None], cs, BIG)
    hit = torch.searchsorted(c_ok.contiguous(), pos.contiguous()).clamp(max=cs.shape[1] - 1)
    member |= torch.gather(c_ok, 1, hit) == pos
    allowed = member[:, None, :] & torch.ones(bm, bm, dtype=torch.bool, device=pos.device).tril()[None]
    bias = torch.zeros(allowed.shape, dtype=qp.dtype, device=qp.device).masked_fill_(~allowed, _NEG_INF)
    _near_rows(acc, qp, kh, vh, index, p.heads, p.kv_head, broken, 0, scale, bias[:, None])
    # a query that keeps no key of its own block: no near part
    none = ~allowed.any(-1)  # [n, bm]
    if bool(none.any()):
        t = (broken[:, None] * bm + torch.arange(bm, device=qp.device))[none]
        for h in p.heads:
            acc.lse[h, t] = _NEG_INF
            acc.o[t, h] = 0


def _grouped(plans: list[HeadPlan], key) -> dict:
    out: dict = {}
    for p in plans:
        out.setdefault(key(p), []).append(p)
    return out


def _prefill_core(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, index: SparseIndex, scale: float,
                  out: torch.Tensor | None = None):
    """q: ``[Tq, Hq, D]``; kh, vh: ``[Hkv, S, D]`` head-major or key-major (``prefill_io.key_rows``),
    ``S = q_offset + Tq``. Returns out ``[Tq, Hq, D]`` in q's dtype and lse ``[Hq, Tq]`` fp32."""
    tq, hq, d = q.shape
    hkv = kh.shape[0]
    group, bm, nqb = hq // hkv, index.block_m, index.num_q_blocks
    index = index.to(q.device)
    t_pad = nqb * bm
    qp = q if tq == t_pad else torch.nn.functional.pad(q, (0, 0, 0, 0, 0, t_pad - tq))  # [T_pad, Hq, D]
    acc = Out(t_pad, hq, d, q.dtype, q.device, bm, into=out if tq == t_pad else None)
    avail, dense = own_range(index)
    plans = [plan_heads(index, heads, group, avail, dense, allow_dense=fused_cpu_ok(q))
             for heads in head_sets(index, group)]
    # plans of one KV head with the same dense prefix / band width run those parts together
    for (g, rows), ps in _grouped(plans, lambda p: (p.kv_head, p.dense_rows)).items():
        if rows:
            heads = sorted(h for p in ps for h in p.heads)
            tj = min(rows * bm, tq)
            qg = q[:tj, heads].transpose(0, 1)  # [S, Tj, D]
            o, l = dense_attention_lse(qg, kh[g, : index.q_offset + tj], vh[g, : index.q_offset + tj],
                                       index.q_offset, scale)
            acc.write_span(heads, o, l)
    for ps in _grouped(plans, lambda p: (p.kv_head, p.band)).values():
        _near_band(acc, qp, kh, vh, index, ps, scale)
    for p in plans:
        _near_diag(acc, qp, kh, vh, index, p, scale)
    far(acc, qp, kh, vh, index, plans, scale)
    if out is not None and acc.o.data_ptr() != out.data_ptr():  # a ragged last block: padded rows dropped
        out.copy_(acc.o[:tq])
        return out, acc.lse[:, :tq]
    return acc.o[:tq], acc.lse[:, :tq]


def _by_head(x: torch.Tensor) -> torch.Tensor:
    """``[S, Hkv, D]`` -> ``[Hkv, S, D]``: a view when ``x`` is one dense block of key rows (as the
    projection and the transformers cache lay keys out), else one head-major copy."""
    t = x.transpose(0, 1)
    return t if row_steps(t) is not None else t.clone(memory_format=torch.contiguous_format)


def _check_inputs(q: torch.Tensor, index: SparseIndex, hkv: int, d: int, where: str) -> None:
    tq, hq, dq = q.shape
    if dq != d:
        raise ValueError(f"{where}: q has head dim {dq} but the keys have {d}")
    if hq % hkv:
        raise ValueError(f"{where}: {hq} query heads is not a multiple of {hkv} KV heads")
    if index.num_heads != hq:
        raise ValueError(f"{where}: index has {index.num_heads} heads, expected one per query head ({hq})")
    if index.q_len != tq:
        raise ValueError(f"{where}: index.q_len is {index.q_len} but q has {tq} queries")


def sparse_prefill_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    scale: float | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
):
    """Attention of one request's query chunk over the keys ``index`` selects (causal on top).

    q: ``[Tq, Hq, D]``; k, v: ``[S, Hkv, D]`` with ``S = index.seq_len`` (strided views fine);
    index: one entry per query head. Returns ``out [Tq, Hq, D]`` in q's dtype and, with
    ``return_lse``, ``lse [Hq, Tq]`` fp32 (natural log; -inf for a query that keeps no key,
    whose output is 0).
    """
    _check_inputs(q, index, k.shape[1], k.shape[2], "sparse_prefill")
    if k.shape[0] != index.seq_len or v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"sparse_prefill: k/v have shapes {tuple(k.shape)}/{tuple(v.shape)}, expected "
            f"[{index.seq_len} (= q_offset {index.q_offset} + q_len {index.q_len}), Hkv, D]"
        )
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous()):
        raise ValueError(f"sparse_prefill: out must be a contiguous {q.dtype} tensor of q's shape "
                         f"{tuple(q.shape)}, found {out.dtype} {tuple(out.shape)}")
    out, lse = _prefill_core(q, _by_head(k.to(q.dtype)), _by_head(v.to(q.dtype)), index, scale, out)
    return (out, lse) if return_lse else out


def sparse_prefill_paged_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table_row: torch.Tensor,
    index: SparseIndex,
    scale: float | None = None,
    return_lse: bool = False,
):
    """``sparse_prefill_torch`` reading K/V of one request from the paged cache.

    k_cache, v_cache: ``[num_blocks, Hkv, block_size, D]`` (strided views of vLLM's cache are
    fine); block_table_row: ``[max_blocks]`` int, the request's logical -> physical blocks, which
    must cover ``index.seq_len`` positions. On CPU the request's positions are first gathered into
    one contiguous copy (``S x Hkv x D``, small next to the attention work).
    """
    _check_inputs(q, index, k_cache.shape[1], k_cache.shape[3], "sparse_prefill_paged")
    bs = k_cache.shape[2]
    if block_table_row.shape[0] * bs < index.seq_len:
        raise ValueError(
            f"sparse_prefill_paged: block table row covers {block_table_row.shape[0]} blocks x {bs} "
            f"tokens, fewer than seq_len {index.seq_len}"
        )
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale

    # one gather of the request's positions into head-major order; every later read is a view or a gather
    pos = torch.arange(index.seq_len, device=k_cache.device)
    blocks = block_table_row.to(k_cache.device).long()[pos // bs]
    kh = _by_head(k_cache[blocks, :, pos % bs].to(q.dtype))
    vh = _by_head(v_cache[blocks, :, pos % bs].to(q.dtype))
    out, lse = _prefill_core(q, kh, vh, index, scale)
    return (out, lse) if return_lse else out
