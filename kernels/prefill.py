"""Sparse prefill attention over a ``SparseIndex``: the torch path (CPU, and the test oracle).

``prefill_plan`` classifies the rows (query blocks) of each set of identical heads; this module
runs them with torch's fused CPU flash kernel and merges partial results by their log-sum-exp:

* dense prefix rows: one dense causal call over the leading blocks (a whole dense head too);
* near part: regular rows read their band ``[bs - b, be)`` as overlapping windows of the K/V
  buffer (a strided view, no copy), a chunk of blocks per batch item under one relative mask
  shared by every item; short rows read their diagonal block (causal, no mask); broken rows read
  it under a membership mask;
* far part (merged into the near part): the keys below the near window. When every row sees a
  prefix of one key list (sinks, vertical columns, strided shards), that list is gathered once and
  runs of rows share a call under prefix masks; otherwise each row's keys are gathered.

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

from .attention_torch import dense_attention_lse, flash, fused_cpu_ok
from .index import SparseIndex
from .prefill_io import Out, adjacent, key_rows, q_rows, row_steps, stack, windows
from .prefill_plan import (BIG, HeadPlan, band_chunk, block_bounds, far_keys, head_sets, in_ranges, keys_below,
                           nested_far, own_range, plan_heads, prefix_chunks, row_tensors)

PAIR_BUDGET = 1 << 22  # (query, key) pairs per call: bounds masks (8 MB in bf16) and gathers
QUERY_BUDGET = 1 << 13  # query rows per far call: bounds its q copy, output and mask rows when key lists are short
GATHER_KEYS = 1 << 14  # key rows one gather of per-row far keys copies (4 MiB of fp32 K at head dim 64)
SPAN_MIN = 1 << 12  # a row keeping all of its far keys [0, far_start) this long reads them as a view
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
    k = band_chunk(b, rows.numel(), s, bm, PAIR_BUDGET)
    leftover: list[int] = []
    for r0, r1 in _runs(rows):
        n_items = (r1 - r0) // k
        if k == 1 or n_items == 0:
            leftover.extend(range(r0, r1))
            continue
        leftover.extend(range(r0 + n_items * k, r1))
        m = k * bm
        bias = _band_bias(b, m, bm, s, qp.dtype, qp.device)
        per_call = max(1, PAIR_BUDGET // (s * m * (b + m)))
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
    per = max(1, QUERY_BUDGET // (s * bm))  # rows per call: bounds the call's query copy and output
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


def _far_rows_of(index: SparseIndex, p: HeadPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``p`` with far keys, and how many each has."""
    cand = torch.nonzero(p.far_start > 0).view(-1)
    if cand.numel() == 0:
        return cand, cand
    rs, re, rc, cs, cc = row_tensors(index, p.heads[0], cand)
    n_far = keys_below(rs, re, rc, cs, cc, p.far_start[cand, None].contiguous())[:, 0]
    return cand[n_far > 0], n_far[n_far > 0]


def _far(acc: Out, qp, kh, vh, index: SparseIndex, plans: list[HeadPlan], scale: float) -> None:
    """Far keys (below each row's near part). Nested ones (every row sees a prefix of one key
    list) run for all plans of a stack size together, many rows per call; the others one row per
    batch item, per plan."""
    nested: dict[int, list] = {}
    for p in plans:
        rows, n_far = _far_rows_of(index, p)
        # rows that keep every key below a long far start (a dense tail) read it as one view
        whole = (n_far == p.far_start[rows]) & (n_far >= SPAN_MIN)
        if bool(whole.any()):
            _far_spans(acc, qp, kh, vh, index, p, rows[whole], scale)
            rows, n_far = rows[~whole], n_far[~whole]
        if rows.numel() == 0:
            continue
        found = nested_far(index, p.heads[0], rows, p.far_start[rows], n_far)
        if found is None:
            _far_rows(acc, qp, kh, vh, index, p, rows, n_far, scale)
        else:
            nested.setdefault(len(p.heads), []).append((p, rows, *found))
    for items in nested.values():
        _far_nested(acc, qp, kh, vh, index, items, scale)


def _far_spans(acc: Out, qp, kh, vh, index: SparseIndex, p: HeadPlan, rows: torch.Tensor, scale: float) -> None:
    """Rows whose far keys are all of ``[0, far_start)``: a view of the keys, no gather."""
    bm, s, d = index.block_m, len(p.heads), qp.shape[2]
    for r, w in zip(rows.tolist(), p.far_start[rows].tolist()):
        row = rows.new_tensor([[r]])
        o, l = flash(stack(q_rows(qp, p.heads, row, bm)), windows(kh, p.kv_head, 0, 1, w, 0),
                     windows(vh, p.kv_head, 0, 1, w, 0), scale=scale)
        acc.merge(p.heads, row, o.view(1, s, bm, d), l.reshape(1, s, bm))


def _far_nested(acc: Out, qp, kh, vh, index: SparseIndex, items: list, scale: float) -> None:
    """Plans (same stack size) whose row r sees the first ``m[r]`` of one gathered key list:
    batch entry = plan, queries = its heads x a run of rows, one prefix mask row per block."""
    bm, d, dev = index.block_m, qp.shape[2], qp.device
    nqb, s = index.num_q_blocks, len(items[0][0].heads)
    (k_flat, head_step, key_step), (v_flat, _, _) = key_rows(kh), key_rows(vh)
    width = max(int(it[2].numel()) for it in items)
    m_all = torch.zeros(len(items), nqb, dtype=torch.long, device=dev)  # keys each plan's row sees
    kv_id = torch.zeros(len(items), width, dtype=torch.long, device=dev)
    for i, (p, rows, keys, m) in enumerate(items):
        m_all[i, rows] = m
        kv_id[i, : keys.numel()] = p.kv_head * head_step + keys * key_step
    rows = torch.nonzero(m_all.amax(0) > 0).view(-1)
    m_max = m_all[:, rows].amax(0).tolist()
    m_low = m_all[:, rows].amin(0).tolist()  # per row, the fewest keys any plan sees
    heads = [h for it in items for h in it[0].heads]
    one_view = s == 1 and adjacent(heads)
    per_row = s * bm * len(items)  # queries of one row across the batch
    for i, j, w in prefix_chunks(m_max, max(1, PAIR_BUDGET // per_row), per_row,
                                 max_rows=max(1, QUERY_BUDGET // per_row)):
        n = j - i
        rows_i = rows[None, i:j]
        m = m_all[:, rows[i:j]]  # [P, n]
        if one_view:  # single-head plans on consecutive heads: their queries are one view
            q = q_rows(qp, heads, rows_i, bm).transpose(0, 1)  # [P, 1, n * bm, D]
        else:
            q = torch.cat([stack(q_rows(qp, it[0].heads, rows_i, bm)) for it in items])
        # keys in slices (one slice unless a single row's list is past the budget: long strided
        # shards, many columns at long context); each slice is gathered, masked and merged alone
        kw = max(bm, PAIR_BUDGET // (per_row * n))
        for k0 in range(0, w, kw):
            k1 = min(w, k0 + kw)
            ids = kv_id[:, k0:k1].reshape(-1)
            kg = k_flat.index_select(0, ids).view(len(items), 1, k1 - k0, d)
            vg = v_flat.index_select(0, ids).view(len(items), 1, k1 - k0, d)
            bias = _prefix_bias(m, k0, k1, s, bm, m_low[i:j], qp.dtype)
            o, l = flash(q, kg, vg, bias, scale=scale)
            l = l.reshape(len(items), s, n, bm)
            l = torch.where((m > k0)[:, None, :, None], l, _NEG_INF)  # a plan's row without keys in the slice
            if one_view:
                acc.merge(heads, rows_i, o.view(1, len(items), n * bm, d), l.view(1, len(items), n * bm))
            else:
                for it, oi, li in zip(items, o, l):
                    acc.merge(it[0].heads, rows_i, oi.view(1, s, n * bm, d), li.reshape(1, s, n * bm))


def _prefix_bias(m: torch.Tensor, k0: int, k1: int, s: int, bm: int, m_low: list[int], dtype) -> torch.Tensor | None:
    """Mask of a nested far call over key slice ``[k0, k1)``, plan p's row r seeing its first
    ``m [P, n]`` keys; queries are heads x rows x ``bm``. None when every row sees the whole slice;
    one mask row per plan when the call has one row (long key lists: strided shards, columns)."""
    if min(m_low) >= k1:
        return None
    p, n = m.shape
    if n == 1:
        return torch.zeros(p, 1, 1, k1 - k0, dtype=dtype, device=m.device).masked_fill_(
            torch.arange(k0, k1, device=m.device) >= m[:, :, None, None], _NEG_INF)
    # [P, heads, rows, bm, kw] filled from a per-row comparison broadcast over heads and queries
    bias = torch.zeros(p, s, n, bm, k1 - k0, dtype=dtype, device=m.device)
    bias.masked_fill_(torch.arange(k0, k1, device=m.device) >= m[:, None, :, None, None], _NEG_INF)
    return bias.view(p, 1, s * n * bm, k1 - k0)


def _far_rows(acc: Out, qp, kh, vh, index: SparseIndex, p: HeadPlan, rows: torch.Tensor, n_far: torch.Tensor,
              scale: float) -> None:
    """Far keys gathered per row (one row per batch item), every query of a row seeing them all."""
    bm, s, d = index.block_m, len(p.heads), qp.shape[2]
    (k_flat, head_step, key_step), (v_flat, _, _) = key_rows(kh), key_rows(vh)
    # key lists are built per batch of rows: one list for every row would be padded to the widest
    # row (a dense tail row: the whole prefix) for all of them
    for i, j, w in _in_order(n_far.tolist(), max(1, min(PAIR_BUDGET // (s * bm), GATHER_KEYS))):
        n = j - i
        ps = far_keys(index, p.heads[0], rows[i:j], p.far_start[rows[i:j]])  # [n, <= w]
        w = ps.shape[1]
        ok = ps < BIG
        kv_id = (p.kv_head * head_step + torch.where(ok, ps, 0) * key_step).view(-1)
        kg = k_flat.index_select(0, kv_id).view(n, 1, w, d)
        vg = v_flat.index_select(0, kv_id).view(n, 1, w, d)
        # one key mask per row (padding off)
        bias = torch.zeros(n, 1, 1, w, dtype=qp.dtype, device=qp.device).masked_fill_(~ok[:, None, None], _NEG_INF)
        rows_i = rows[i:j, None]
        o, l = flash(stack(q_rows(qp, p.heads, rows_i, bm)), kg, vg, bias, scale=scale)
        acc.merge(p.heads, rows_i, o.view(n, s, bm, d), l.reshape(n, s, bm))


def _in_order(width: list[int], budget: int):
    """Batches ``(i, j, w)`` of consecutive items with ``(j - i) * w <= budget``, w the widest:
    items stay in row order, so a batch's queries and outputs are views of contiguous rows
    (neighbouring rows have similar far key counts, so little padding is lost)."""
    i = 0
    while i < len(width):
        j, w = i + 1, width[i]
        while j < len(width) and (j + 1 - i) * max(w, width[j]) <= budget:
            w = max(w, width[j])
            j += 1
        yield i, j, max(1, w)
        i = j


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
    _far(acc, qp, kh, vh, index, plans, scale)
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
