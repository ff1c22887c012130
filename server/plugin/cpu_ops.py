"""Prefill rows on vLLM's own CPU attention op, driven by virtual block tables.

vLLM's CPU backend ships a fused paged-attention op (AMX or AVX-512 code paths) that attends each
request's queries to the keys its block-table row lists, causally *by position within the row*.
The row need not describe a real request: for one block of queries, listing only the KV pages its
``SparseIndex`` keeps (sink pages, the window behind it, its own pages last) makes the op compute
exactly that block's sparse attention. It does so when every kept range starts on a page boundary
and every range but the one holding the queries also ends on one; columns (single keys) have no
page form. One op call then runs every query block of a set of heads, each block a *virtual
request* with its own row.

The real cache keeps the page layout of the op's portable ``vec`` code path (``kv_cache.py``),
which torch also reads through strided views: dense decode rows attend straight from it
(``decode_dense``). Prefill compute is faster on the AMX code path, whose packed pages torch cannot
read, so each prefill row's K/V are packed once per layer into a scratch cache of ``PAGE``-token
pages with vLLM's writer. Indices that do not fit (columns, unaligned
ranges, a chunk that starts off a page boundary) return ``None`` and the caller falls back to the
torch kernel. Dense rows always fit: one request over the whole sequence.

Per layer on a 2-core Xeon with AMX (SmolLM2 geometry, bf16, 8K tokens; ``bench/cpu_native.py``,
``bench/results/cpu_native-vm.json``): dense causal prefill 101 ms on the op vs 135 ms on the torch
kernel; the default plan's A-shape 64/257 with a 64-query dense tail 24 ms vs 135 ms; dense decode
of one token 0.37 ms vs 3.4 ms.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from headwise.server import env
from headwise.kernels.index import SparseIndex
from headwise.kernels.prefill_plan import head_sets

PAGE = 32  # tokens per scratch page (the AMX code path needs a multiple of 32)
CACHE_ISA = "vec"  # the code path whose page layout the real cache keeps (``kv_cache.py``)


@functools.lru_cache(maxsize=None)
def _isa(dtype: torch.dtype, head_dim: int) -> str | None:
    """vLLM's instruction-set choice for this dtype and head size, or None without the op."""
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        if not hasattr(ops, "cpu_attention_with_kv_cache") or not hasattr(torch.ops._C, "cpu_attention_with_kv_cache"):
            return None
        isa = _get_attn_isa(dtype, PAGE, head_dim)
    except Exception:  # another vLLM build (CUDA) or an unsupported dtype/head size
        return None
    if isa == "amx" and not torch.cpu._init_amx():  # the process must ask the kernel for AMX tiles
        return None
    return isa


def available(dtype: torch.dtype, head_dim: int) -> bool:
    return env.cpu_native() and _isa(dtype, head_dim) is not None


@dataclass
class NativeCall:
    """One op call: a set of query heads of one KV head (or every head of the layer, ``kv_head``
    None, when all heads keep the same keys), every query block a virtual request."""

    heads: list[int]
    kv_head: int | None
    block_table: torch.Tensor  # [R, max_pages] int32 scratch pages
    seq_lens: torch.Tensor  # [R] int32 virtual lengths
    query_start_loc: torch.Tensor  # [R + 1] int32 rows of the chunk's queries


def _pages(start: int, end: int) -> range:
    return range(start // PAGE, -(-end // PAGE))


def _rows_for_head(index: SparseIndex, h: int) -> tuple[list[list[int]], list[int], list[int]] | None:
    """Page lists, virtual lengths and query counts of head ``h``'s blocks, or None when a block's
    key set is not a list of whole pages ending in the block's own span."""
    if int(index.column_count[h].max()) > 0:
        return None
    starts, ends, counts = index.range_start[h].tolist(), index.range_end[h].tolist(), index.range_count[h].tolist()
    pages_per_row, lens, q_counts = [], [], []
    for i in range(index.num_q_blocks):
        bs = index.q_offset + i * index.block_m
        be = min(bs + index.block_m, index.seq_len)
        ranges = [(s, min(e, be)) for s, e in zip(starts[i][:counts[i]], ends[i][:counts[i]]) if s < be]
        if not ranges or ranges[-1][0] > bs or ranges[-1][1] < be:
            return None  # the block's own span is not one kept range
        if any(s % PAGE for s, _ in ranges) or any(e % PAGE for _, e in ranges[:-1]):
            return None
        pages = [p for s, e in ranges for p in _pages(s, e)]
        pages_per_row.append(pages)
        lens.append(len(pages) * PAGE - (-(-be // PAGE) * PAGE - be))
        q_counts.append(be - bs)
    return pages_per_row, lens, q_counts


def _is_dense(index: SparseIndex, h: int) -> bool:
    """Every block of head ``h`` keeps exactly its causal prefix ``[0, block end)``."""
    bs = index.q_offset + torch.arange(index.num_q_blocks) * index.block_m
    be = torch.clamp(bs + index.block_m, max=index.seq_len)
    return bool((index.column_count[h] == 0).all() and (index.range_count[h] == 1).all()
                and (index.range_start[h, :, 0] == 0).all() and (index.range_end[h, :, 0] >= be).all())


def plan_calls(index: SparseIndex, num_kv_heads: int) -> list[NativeCall] | None:
    """The op calls for ``index`` (all heads of a layer), or None when some head does not fit."""
    group = index.num_heads // num_kv_heads
    calls = []
    for heads in head_sets(index, group):
        h = heads[0]
        if _is_dense(index, h):  # one request over the whole sequence, its queries last
            rows, lens, q_counts = [list(_pages(0, index.seq_len))], [index.seq_len], [index.q_len]
        else:
            found = _rows_for_head(index, h)
            if found is None:
                return None
            rows, lens, q_counts = found
        table = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.int32)
        for r, pages in enumerate(rows):
            table[r, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        qsl = torch.zeros(len(rows) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(torch.tensor(q_counts, dtype=torch.int32), 0)
        calls.append(NativeCall(heads, h // group, table, torch.tensor(lens, dtype=torch.int32), qsl))
    first = calls[0]
    if len(calls) == num_kv_heads and all(len(c.heads) == group and torch.equal(c.block_table, first.block_table)
                                          and torch.equal(c.seq_lens, first.seq_lens) for c in calls):
        # every head keeps the same keys: one call over all heads and KV heads, no slicing
        return [NativeCall(list(range(index.num_heads)), None, first.block_table, first.seq_lens,
                           first.query_start_loc)]
    return calls


def pack(k: torch.Tensor, v: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``k, v [S, Hkv, D]`` (unit stride along D) -> the op's scratch K/V pages ``[P, Hkv, PAGE, D]``."""
    from vllm import _custom_ops as ops

    s, h, d = k.shape
    pages = torch.zeros(-(-s // PAGE), h, 2 * PAGE, d, dtype=k.dtype)  # the op reads whole pages: no NaN garbage
    k_pages, v_pages = pages.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, k_pages, v_pages, torch.arange(s), isa)
    return k_pages, v_pages


def run_calls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, calls: list[NativeCall], scale: float) -> torch.Tensor:
    """Attention of the chunk's queries ``q [Tq, Hq, D]`` over the sequence's ``k, v [S, Hkv, D]``."""
    from vllm import _custom_ops as ops

    isa = _isa(q.dtype, q.shape[-1])
    whole = len(calls) == 1 and calls[0].kv_head is None
    out = torch.empty_like(q)
    packed: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}
    for call in calls:
        if call.kv_head not in packed:
            g = call.kv_head
            packed[g] = pack(k, v, isa) if g is None else pack(k[:, g:g + 1], v[:, g:g + 1], isa)
        k_pages, v_pages = packed[call.kv_head]
        qh = q.contiguous() if whole else q[:, call.heads].contiguous()
        oh = out if whole else torch.empty_like(qh)
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=call.seq_lens.shape[0], num_heads=len(call.heads), num_kv_heads=k_pages.shape[1],
            head_dim=q.shape[-1], seq_lens=call.seq_lens, dtype=q.dtype, query_start_loc=call.query_start_loc,
            causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
        ops.cpu_attention_with_kv_cache(
            query=qh, key_cache=k_pages, value_cache=v_pages, output=oh, query_start_loc=call.query_start_loc,
            seq_lens=call.seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=call.block_table, softcap=0.0, scheduler_metadata=meta, s_aux=None)
        if not whole:
            out[:, call.heads] = oh
    return out


def decode_dense(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, step_cache: dict | None = None) -> torch.Tensor:
    """Dense decode rows ``q [B, Hq, D]`` straight from the real paged cache (every cached token).
    ``step_cache``: a dict kept for one scheduler step; the op's schedule is made once per step."""
    from vllm import _custom_ops as ops

    b, hq, d = q.shape
    nb, hkv, bs, _ = kv_cache.shape
    k_pages, v_pages = kv_cache.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
    key = ("native_decode", b, hq, hkv, d, q.dtype)
    step = None if step_cache is None else step_cache.get(key)
    if step is None:
        qsl = torch.arange(b + 1, dtype=torch.int32)
        lens = seq_lens.to(torch.int32)
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=b, num_heads=hq, num_kv_heads=hkv, head_dim=d, seq_lens=lens, dtype=q.dtype,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=CACHE_ISA, enable_kv_split=True)
        step = (qsl, lens, block_table.to(torch.int32), meta)
        if step_cache is not None:
            step_cache[key] = step
    qsl, lens, table, meta = step
    q = q.contiguous()
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=k_pages, value_cache=v_pages, output=out, query_start_loc=qsl, seq_lens=lens,
        scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
        softcap=0.0, scheduler_metadata=meta, s_aux=None)
    return out


def decode_available(kv_cache: torch.Tensor) -> bool:
    """The real cache can be read by the op: CPU, a supported dtype, pages of a multiple of 32."""
    return (kv_cache.device.type == "cpu" and kv_cache.shape[2] % 32 == 0 and (kv_cache.shape[-1] // 2) % 32 == 0
            and available(kv_cache.dtype, kv_cache.shape[-1] // 2))


def write(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """vLLM's own writer for the real cache (the layout ``kv_cache.split_kv`` reads; one fused call)."""
    from vllm import _custom_ops as ops

    nb, hkv, bs, d2 = kv_cache.shape
    k_pages, v_pages = kv_cache.view(nb, hkv, 2 * bs, d2 // 2).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, k_pages, v_pages, slots, CACHE_ISA)
