"""vLLM's own CPU attention op, run straight on the paged cache through virtual block tables.

vLLM's CPU backend ships a fused paged-attention op (``cpu_attention_with_kv_cache``) that attends
each request's queries to the pages its block-table row lists, causally *by position within the
row*. The row need not describe a real request: for one 64-query block of a prefill, a row that
lists the cache pages holding the keys its ``SparseIndex`` keeps, with the block's own pages last,
makes the op compute that block's sparse attention reading the real cache, no copy. A kept key
set that is not made of whole pages (columns, unaligned diagonals, a window that starts mid-page)
is *rounded up* to the pages it touches: a superset of the pattern's keys, whose density
(``OpSchedule.kept_pairs``) is what the stats report.

Everything here is planned on the host once per scheduler step and shared by every layer that
uses the same index (``plan_prefill``, ``plan_batch``); per layer the impl only calls ``run``.

* Dense rows, dense layers and dense decode rows: one virtual request per real request, which is
  exactly the call stock vLLM makes (``plan_batch``): dense attention costs what stock costs.
* Sparse prefill rows: one virtual request per query block, one op call per set of query heads
  that keep the same pages (one call for the whole layer when every head does).

The real cache keeps the page layout of one of the op's code paths (``cache_isa``): the one stock
vLLM picks on this machine (``amx`` for bf16 on CPUs with AMX tiles) whenever every torch reader of
the cache can do without strided views, else the portable ``vec`` layout, which torch reads through
strided views (``kv_cache.split_kv``) for the patterns that need torch (token-level decode
selections). Estimation copies the keys it reads either way (``kv_cache.read_kv`` unpacks AMX pages).
Measured on a 2-core Xeon with AMX, one op call on each layout (9 query heads, 3 KV heads, head
dim 64, bf16, best of 3): 2,048 causal queries over 8K keys 136 ms on ``vec`` vs 38 ms on ``amx``
(3.5x), over 32K keys 611 vs 168 ms, one decode query over 32K keys 1.8 vs 0.8 ms: a ``vec`` cache
on such a machine makes dense attention ~3x slower than stock's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from headwise.kernels.index import DecodeMode, DecodeSelection, SparseIndex
from headwise.server import env

from .pages import merge_blocks, page_mask, page_round_windows

CACHE_ISA = "vec"  # the portable code path; its page layout is the one torch reads through strided views
AMX_ISA = "amx"  # vLLM's bf16 code path on AMX CPUs: VNNI-packed pages (``unpack_pages``)


def stock_isa(dtype: torch.dtype, block_size: int, head_dim: int) -> str:
    """The op code path stock vLLM's CPU backend picks for this cache (its own rule)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return _get_attn_isa(dtype, block_size, head_dim)
    except Exception:  # another vLLM build, or the rule moved
        return CACHE_ISA


def cache_isa(dtype: torch.dtype, block_size: int, head_dim: int, torch_reads_pages: bool) -> str:
    """The layout headwise keeps its cache in: stock's AMX layout when stock would use it and no
    torch kernel reads the cache pages in place (``torch_reads_pages``: a plan with token-level decode
    selections), else ``vec``. The builder and the impl call it with the same arguments."""
    if torch_reads_pages or stock_isa(dtype, block_size, head_dim) != AMX_ISA:
        return CACHE_ISA
    if hasattr(torch.cpu, "_init_amx"):
        torch.cpu._init_amx()  # the process's permission to use AMX tiles (vLLM's workers ask too)
    return AMX_ISA


def unpack_pages(k_pages: torch.Tensor, v_pages: torch.Tensor | None, isa: str):
    """Pages ``[n, Hkv, block_size, D]`` as the op stores them (a gathered copy of ``page_views``)
    -> the same pages in token order ``[n, Hkv, block_size, D]`` (copies; views for ``vec``, whose
    K pages are read through ``kv_cache.split_kv``'s transpose instead). AMX pages pack bf16 pairs:
    K as [16-token groups][32-dim chunks][dim pairs][16 tokens][2 dims], V as
    [16-dim groups][token pairs][16 dims][2 tokens]."""
    if isa != AMX_ISA:
        raise ValueError(f"unpack_pages reads AMX pages, not {isa!r}")
    n, h, bs, d = k_pages.shape
    k = k_pages.reshape(n, h, bs // 16, d // 32, 16, 16, 2).permute(0, 1, 2, 5, 3, 4, 6).reshape(n, h, bs, d)
    if v_pages is None:
        return k, None
    v = v_pages.reshape(n, h, d // 16, bs // 2, 16, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, h, bs, d)
    return k, v


@functools.lru_cache(maxsize=None)
def _has_op() -> bool:
    try:
        from vllm import _custom_ops as ops

        return hasattr(ops, "cpu_attention_with_kv_cache") and hasattr(torch.ops._C, "cpu_attention_with_kv_cache")
    except Exception:  # another vLLM build (CUDA) or no vLLM
        return False


def available(dtype: torch.dtype, head_dim: int) -> bool:
    """vLLM's op can run this dtype and head size here (``HEADWISE_CPU_NATIVE=0`` says never)."""
    return env.cpu_native() and _has_op() and dtype in (torch.bfloat16, torch.float16, torch.float32) \
        and head_dim % 32 == 0


def cache_readable(kv_cache: torch.Tensor) -> bool:
    """The op can read this cache: CPU, a supported dtype, pages of a multiple of 32 tokens."""
    return (kv_cache.device.type == "cpu" and kv_cache.shape[2] % 32 == 0
            and available(kv_cache.dtype, kv_cache.shape[-1] // 2))


decode_available = cache_readable  # the name the KV writer and older callers use


def page_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V page views ``[num_blocks, Hkv, block_size, D]`` in the op's layout (no copy)."""
    nb, hkv, bs, d2 = kv_cache.shape
    k_pages, v_pages = kv_cache.view(nb, hkv, 2 * bs, d2 // 2).chunk(2, dim=2)
    return k_pages, v_pages


# ------------------------------------------------------------------------------ schedules
@dataclass
class OpCall:
    """One op call: query heads ``heads`` (None: all) over KV head ``kv_head`` (None: all), every
    virtual request a row of ``block_table`` (real cache block ids) with its length and queries."""

    heads: list[int] | None
    kv_head: int | None
    block_table: torch.Tensor  # [R, max_pages] int32
    seq_lens: torch.Tensor  # [R] int32 virtual lengths
    query_start_loc: torch.Tensor  # [R + 1] int32, rows of the call's queries
    metadata: torch.Tensor  # the op's work schedule, made once per step


@dataclass
class OpSchedule:
    """Everything the op needs for one row (or batch) in one step, and the pairs it attends."""

    calls: list[OpCall]
    kept_pairs: int  # (query, key) pairs attended per query head, summed over heads
    causal_pairs: int
    extra: dict = field(default_factory=dict)

    @property
    def density(self) -> float:
        return self.kept_pairs / self.causal_pairs if self.causal_pairs else 1.0


def _metadata(seq_lens: torch.Tensor, qsl: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype, split_kv: bool, isa: str) -> torch.Tensor:
    from vllm import _custom_ops as ops

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.shape[0], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=split_kv)


def _causal_pairs(q_lens: torch.Tensor, seq_lens: torch.Tensor) -> int:
    """Pairs of causal attention for requests of ``q_lens`` queries ending at ``seq_lens`` keys."""
    q, s = q_lens.long(), seq_lens.long()
    return int((q * (s - q) + q * (q + 1) // 2).sum())


def plan_batch(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, num_heads: int,
               num_kv_heads: int, head_dim: int, dtype: torch.dtype, isa: str = CACHE_ISA) -> OpSchedule:
    """Dense causal attention of whole requests (prefill chunks and decodes alike), as stock does:
    ``query_start_loc [B+1]``, ``seq_lens [B]``, ``block_table [B, max_blocks]`` as vLLM gives them;
    ``isa``: the code path whose layout the cache keeps (``cache_isa``)."""
    qsl = query_start_loc.to(torch.int32)
    lens = seq_lens.to(torch.int32)
    decode_only = bool((qsl[1:] - qsl[:-1] == 1).all())
    meta = _metadata(lens, qsl, num_heads, num_kv_heads, head_dim, dtype, split_kv=decode_only, isa=isa)
    call = OpCall(None, None, block_table.to(torch.int32), lens, qsl, meta)
    pairs = _causal_pairs(qsl[1:] - qsl[:-1], lens) * num_heads
    return OpSchedule([call], pairs, pairs)


def _rows(mask: torch.Tensor, start: torch.Tensor, end: torch.Tensor, page: int, block_row: torch.Tensor):
    """Virtual requests of one head set: ``mask [NQB, P]`` -> (block table of real ids, lengths, qsl)."""
    counts = mask.sum(1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # kept pages first, ascending
    width = int(counts.max())
    pages = order[:, :width]
    keep = torch.arange(width)[None, :] < counts[:, None]
    table = torch.where(keep, block_row.long()[pages], 0).to(torch.int32)
    # the last page holds the block's last query: trim the row to end exactly there
    lens = (counts * page - (-(-end // page) * page - end)).to(torch.int32)
    q_counts = (end - start).to(torch.int32)
    qsl = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_counts, 0)
    return table, lens, qsl


def _dense_heads(index: SparseIndex) -> torch.Tensor:
    """``[H]`` bool: every block of the head keeps exactly its causal prefix."""
    start = index.q_offset + torch.arange(index.num_q_blocks) * index.block_m
    end = torch.clamp(start + index.block_m, max=index.seq_len)
    return ((index.column_count == 0).all(1) & (index.range_count == 1).all(1)
            & (index.range_start[:, :, 0] == 0).all(1) & (index.range_end[:, :, 0] >= end[None]).all(1)) \
        if index.range_start.shape[2] else torch.zeros(index.num_heads, dtype=torch.bool)


def plan_prefill(index: SparseIndex, block_row: torch.Tensor, page: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, isa: str = CACHE_ISA, merge: int = 1) -> OpSchedule:
    """The op calls for one prefill chunk's ``index`` (all local heads) over the request's cache pages
    ``block_row``; heads that keep the same pages share a call. ``merge``: query blocks per virtual
    request (``merge_blocks``)."""
    index = index.to("cpu")
    h = index.num_heads
    group = h // num_kv_heads
    start = index.q_offset + torch.arange(index.num_q_blocks) * index.block_m
    end = torch.clamp(start + index.block_m, max=index.seq_len)
    causal_per_head = _causal_pairs(end - start, end)
    dense = _dense_heads(index)
    if bool(dense.all()):  # one request over the whole sequence, its queries last
        one = plan_batch(torch.tensor([0, index.q_len]), torch.tensor([index.seq_len]), block_row[None], h,
                         num_kv_heads, head_dim, dtype, isa)
        return one
    mask, start, end = merge_blocks(page_mask(index, page), start, end, merge)  # [H, rows, P]
    flat = mask.reshape(h, -1)
    # heads with identical page sets, per KV head (a call reads one KV head unless all heads agree)
    sets: list[list[int]] = []
    for g in range(num_kv_heads):
        reps: list[list[int]] = []
        for hh in range(g * group, (g + 1) * group):
            same = next((s for s in reps if torch.equal(flat[s[0]], flat[hh])), None)
            (same.append(hh) if same is not None else reps.append([hh]))
        sets.extend(reps)
    whole = len(sets) == num_kv_heads and all(torch.equal(flat[s[0]], flat[0]) for s in sets)
    calls, kept = [], 0
    for heads in ([list(range(h))] if whole else sets):
        table, lens, qsl = _rows(mask[heads[0]], start, end, page, block_row)
        kv = None if whole else heads[0] // group
        meta = _metadata(lens, qsl, len(heads), num_kv_heads if whole else 1, head_dim, dtype, split_kv=False,
                         isa=isa)
        calls.append(OpCall(None if whole else heads, kv, table, lens, qsl, meta))
        kept += _causal_pairs(qsl[1:] - qsl[:-1], lens) * len(heads)
    return OpSchedule(calls, kept, causal_per_head * h)


# --------------------------------------------------------------------------- decode rows
OP_DECODE_MODES = (int(DecodeMode.DENSE), int(DecodeMode.WINDOW))  # selections the op runs


def plan_decode(sel: DecodeSelection, seq_lens: torch.Tensor, block_table: torch.Tensor, page: int,
                num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                isa: str = CACHE_ISA) -> OpSchedule:
    """Op calls for decode rows whose selection is dense or sink + window (``OP_DECODE_MODES``):
    each (row, head) reads the cache pages holding its sink and its window (``page_round_windows``;
    the row's own page last), and heads that read the same pages in every row share a call.
    ``sel``: ``[B, H]`` over query heads or ``[B, Hkv]`` shared per GQA group; seq_lens ``[B]``."""
    sel = page_round_windows(sel.to("cpu"), seq_lens, page)
    b = seq_lens.shape[0]
    lens = seq_lens.cpu().long()
    group = num_heads // num_kv_heads
    per_kv = sel.num_heads == num_kv_heads and num_heads != num_kv_heads
    n_pages = -(-lens // page)  # [B] pages holding the sequence, the current token in the last
    dense = sel.mode == int(DecodeMode.DENSE)
    sink_pages = torch.where(dense, n_pages[:, None], -(-sel.sink.long() // page))  # [B, Hs] leading pages
    first_window = torch.where(dense, n_pages[:, None], (lens[:, None] - sel.window.long()) // page)
    # a head's pages per row: [0, sink_pages) and [first_window, n_pages); heads agreeing in every row share a call
    keys = torch.stack([torch.minimum(sink_pages, first_window), first_window], -1)  # [B, Hs, 2]
    sets: list[list[int]] = []
    for g in range(num_kv_heads):
        reps: list[list[int]] = []
        for hh in range(g * group, (g + 1) * group):
            col = keys[:, hh // group if per_kv else hh]
            same = next((r for r in reps if torch.equal(keys[:, r[0] // group if per_kv else r[0]], col)), None)
            (same.append(hh) if same is not None else reps.append([hh]))
        sets.extend(reps)
    first_key = keys[:, 0]
    whole = len(sets) == num_kv_heads and all(
        torch.equal(keys[:, s[0] // group if per_kv else s[0]], first_key) for s in sets)
    width = int(n_pages.max()) if b else 1
    pos = torch.arange(width)
    calls, kept = [], 0
    qsl = torch.arange(b + 1, dtype=torch.int32)
    for heads in ([list(range(num_heads))] if whole else sets):
        k = keys[:, heads[0] // group if per_kv else heads[0]]  # [B, 2]: sink pages, first window page
        keep = (pos[None, :] < k[:, :1]) | ((pos[None, :] >= k[:, 1:]) & (pos[None, :] < n_pages[:, None]))
        count = keep.sum(1)
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        w = max(1, int(count.max()) if b else 1)
        row_pages = order[:, :w]
        live = torch.arange(w)[None, :] < count[:, None]
        table = torch.where(live, torch.gather(block_table.cpu().long(), 1, row_pages), 0).to(torch.int32)
        vlens = (count * page - (n_pages * page - lens)).to(torch.int32)  # trimmed at the current token
        meta = _metadata(vlens, qsl, len(heads), num_kv_heads if whole else 1, head_dim, dtype, split_kv=True,
                         isa=isa)
        calls.append(OpCall(None if whole else heads, None if whole else heads[0] // group, table, vlens, qsl,
                            meta))
        kept += int(vlens.long().sum()) * len(heads)
    return OpSchedule(calls, kept, int(lens.sum()) * num_heads)


# ------------------------------------------------------------------------------ the run
def run(q: torch.Tensor, cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor], schedule: OpSchedule,
        scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``q [T, Hq, D]`` (the schedule's query rows, in order) over the real cache:
    the layer's cache tensor, or its ``page_views`` (made once per layer by the impl)."""
    from vllm import _custom_ops as ops

    k_all, v_all = page_views(cache) if isinstance(cache, torch.Tensor) else cache
    if out is None:
        out = torch.empty_like(q)
    for call in schedule.calls:
        g = call.kv_head
        # one KV head: a strided view of the pages (the op honours strides)
        k_pages, v_pages = (k_all, v_all) if g is None else (k_all[:, g:g + 1], v_all[:, g:g + 1])
        qh = q if call.heads is None else q[:, call.heads]
        qh = qh if qh.is_contiguous() else qh.contiguous()
        oh = out if call.heads is None and out.is_contiguous() else torch.empty_like(qh)
        ops.cpu_attention_with_kv_cache(
            query=qh, key_cache=k_pages, value_cache=v_pages, output=oh, query_start_loc=call.query_start_loc,
            seq_lens=call.seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=call.block_table, softcap=0.0, scheduler_metadata=call.metadata, s_aux=None)
        if oh is not out:
            if call.heads is None:
                out.copy_(oh)
            else:
                out[:, call.heads] = oh
    return out


def decode_dense(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, step_cache: dict | None = None, isa: str = CACHE_ISA) -> torch.Tensor:
    """Dense decode rows ``q [B, Hq, D]`` straight from the paged cache (every cached token)."""
    b, hq, d = q.shape
    key = ("native_decode", b, hq, kv_cache.shape[1], d, q.dtype, isa)
    schedule = None if step_cache is None else step_cache.get(key)
    if schedule is None:
        schedule = plan_batch(torch.arange(b + 1), seq_lens, block_table, hq, kv_cache.shape[1], d, q.dtype, isa)
        if step_cache is not None:
            step_cache[key] = schedule
    return run(q, kv_cache, schedule, scale)


def write(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
          isa: str = CACHE_ISA) -> None:
    """vLLM's own writer for the real cache, in ``isa``'s layout (``vec``: the one
    ``kv_cache.split_kv`` reads; one fused call)."""
    write_pages(key, value, *page_views(kv_cache), slots, isa)


def write_pages(key: torch.Tensor, value: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                slots: torch.Tensor, isa: str = CACHE_ISA) -> None:
    """``write`` into page views the caller keeps (the per-layer hot path); slot -1 is skipped."""
    from vllm import _custom_ops as ops

    ops.cpu_attn_reshape_and_cache(key, value, k_pages, v_pages, slots, isa)
