"""The far part of the torch sparse prefill (``prefill.py``): each row's keys below its near window.

When every row of a head set sees a prefix of one key list (sinks, vertical columns, strided
shards: ``nested_far``), that list is gathered once and runs of rows share a call under prefix
masks, the plans of one stack size batched together; a row that keeps every key below its far
start reads them as a view; any other row's keys are gathered per row, in batches of rows whose
key lists pad little against each other. Each part is folded into the output by its log-sum-exp.
Every call stays within ``prefill_plan.PAIR_BUDGET`` (query, key) pairs and ``QUERY_BUDGET``
queries, so its gathers and masks are bounded whatever the context.
"""

from __future__ import annotations

import torch

from . import prefill_plan
from .attention_torch import flash
from .index import SparseIndex
from .prefill_io import Out, adjacent, key_rows, q_rows, stack, windows
from .prefill_plan import BIG, HeadPlan, far_keys, keys_below, nested_far, prefix_chunks, row_tensors

GATHER_KEYS = 1 << 14  # key rows one gather of per-row far keys copies (4 MiB of fp32 K at head dim 64)
SPAN_MIN = 1 << 12  # a row keeping all of its far keys [0, far_start) this long reads them as a view
_NEG_INF = float("-inf")


def _far_rows_of(index: SparseIndex, p: HeadPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``p`` with far keys, and how many each has."""
    cand = torch.nonzero(p.far_start > 0).view(-1)
    if cand.numel() == 0:
        return cand, cand
    rs, re, rc, cs, cc = row_tensors(index, p.heads[0], cand)
    n_far = keys_below(rs, re, rc, cs, cc, p.far_start[cand, None].contiguous())[:, 0]
    return cand[n_far > 0], n_far[n_far > 0]


def far(acc: Out, qp, kh, vh, index: SparseIndex, plans: list[HeadPlan], scale: float) -> None:
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
    for i, j, w in prefix_chunks(m_max, max(1, prefill_plan.PAIR_BUDGET // per_row), per_row,
                                 max_rows=max(1, prefill_plan.QUERY_BUDGET // per_row)):
        n = j - i
        rows_i = rows[None, i:j]
        m = m_all[:, rows[i:j]]  # [P, n]
        if one_view:  # single-head plans on consecutive heads: their queries are one view
            q = q_rows(qp, heads, rows_i, bm).transpose(0, 1)  # [P, 1, n * bm, D]
        else:
            q = torch.cat([stack(q_rows(qp, it[0].heads, rows_i, bm)) for it in items])
        # keys in slices (one slice unless a single row's list is past the budget: long strided
        # shards, many columns at long context); each slice is gathered, masked and merged alone
        kw = max(bm, prefill_plan.PAIR_BUDGET // (per_row * n))
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
    # one mask row per (plan, row), copied once into [P, heads x rows x bm, kw] (no staged copies)
    row = torch.zeros(p, 1, n, 1, k1 - k0, dtype=dtype, device=m.device)
    row.masked_fill_(torch.arange(k0, k1, device=m.device) >= m[:, None, :, None, None], _NEG_INF)
    return row.expand(p, s, n, bm, k1 - k0).reshape(p, 1, s * n * bm, k1 - k0)


def _far_rows(acc: Out, qp, kh, vh, index: SparseIndex, p: HeadPlan, rows: torch.Tensor, n_far: torch.Tensor,
              scale: float) -> None:
    """Far keys gathered per row (one row per batch item), every query of a row seeing them all."""
    bm, s, d = index.block_m, len(p.heads), qp.shape[2]
    (k_flat, head_step, key_step), (v_flat, _, _) = key_rows(kh), key_rows(vh)
    # key lists are built per batch of rows: one list for every row would be padded to the widest
    # row (a dense tail row: the whole prefix) for all of them
    for i, j, w in _in_order(n_far.tolist(), max(1, min(prefill_plan.PAIR_BUDGET // (s * bm), GATHER_KEYS))):
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
