"""The per-layer run of the headwise backend: write K/V, then run what the step plan says.

vLLM calls ``do_kv_cache_update`` (new tokens' K/V into the paged cache) and then ``forward``
for every attention layer. By then every position ``0..seq_len-1`` of every request is in the
cache, so a prefill row attends over the whole sequence read from there: later chunks of a
chunked prefill and prefix-cache hits see their earlier context.

The step plan (``metadata.HeadwiseMetadata``, built once per scheduler step) already holds every
static index and every op schedule; per layer this module only

* runs the whole batch as one dense op call when the layer is dense for every row of the step
  (the call stock vLLM makes: dense attention costs what it costs stock);
* decode rows: dense layers straight to vLLM's op; otherwise one ``DecodeSelection`` for the
  layer's local heads (``build_layer_decode_selection``, which also writes/reads the TidalDecode
  buffer and reads the Quest page summaries this impl keeps up to date as K is written) and one
  batched decode call;
* prefill rows: the step's static work for the layer's signature, or, for patterns that estimate
  from q and k, the index built here from this layer's queries and the request's cached keys;
  then vLLM's op over the cache pages (CPU) or the sparse prefill kernel.

On CUDA the step is planned for one launch per layer (``cuda_step.BatchedWork``, ``_forward_batched``):
FlashAttention for every row the layer attends densely, one varlen launch of the sparse kernel for
all its sparse prefill rows, FlashAttention again for the heads of whole dense GQA groups, then the
decode rows; nothing in that path reads a device value back to the host.

The kernels are looked up through this module's ``KERNELS`` table at call time so routing tests
can swap in recording fakes (Triton on CUDA, torch on CPU, vLLM's op on CPU where it applies).
"""

from __future__ import annotations

import math
import time

import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from headwise.kernels.decode_select import PageSummaries, update_page_summaries
from headwise.kernels.index import DecodeMode
from headwise.kernels.varlen import VarlenIndex
from headwise.patterns.ranges import kept_pairs

from . import cpu_ops, runner
from .cuda_step import BatchedWork
from .metadata import HeadwiseMetadata, OpTarget, PrefillRow, prefill_work
from .kv_cache import read_kv, split_kv, write_kv
from .plan_binding import LayerBinding, PlanBinding, layer_index, worker_binding
from .stats import get_recorder
from .timing import phase

PREFILL, DECODE = 0, 1

KERNELS = runner.KERNELS  # the runner's table (tests replace entries to record the routing)


class HeadwiseImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 binding: PlanBinding | None = None, batched: bool | None = None, **extra) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        unsupported = {
            "ALiBi slopes": alibi_slopes is not None,
            "a sliding window": sliding_window not in (None, -1),
            "a logits soft cap": logits_soft_cap not in (None, 0),
            f"attention type {attn_type!r}": attn_type != AttentionType.DECODER,
            "KV sharing between layers": kv_sharing_target_layer_name is not None,
            f"kv_cache_dtype {kv_cache_dtype!r}": kv_cache_dtype not in ("auto", "float16", "bfloat16", "float32"),
            "attention sinks": extra.get("sinks") is not None,
        }
        bad = [what for what, present in unsupported.items() if present]
        if bad:
            raise NotImplementedError(
                f"headwise attention supports plain causal decoder attention; this model's layer asks for "
                f"{', '.join(bad)}")
        # Loads and validates the plan (once per process): a bad plan stops model construction here.
        self.binding = binding or worker_binding()
        self.binding.check_local(num_heads, self.num_kv_heads, head_size)
        self.layer: LayerBinding | None = None
        self.batched = batched  # the CUDA path's K/V write (no host sync); None: decided by the cache's device
        self._cache_ok: bool | None = None  # vLLM's CPU op can read this layer's cache (fixed per layer)
        self._isa: str | None = None  # the op layout this layer's CPU cache keeps (``cpu_ops.cache_isa``)
        self._views: tuple | None = None  # (cache, K pages, V pages) for vLLM's op
        # Quest page key min/max beside this layer's cache (page_topk layers only), kept as K is written
        self._summaries: tuple[torch.Tensor, PageSummaries] | None = None

    # ------------------------------------------------------------------ KV cache
    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        # key, value: [T, Hkv, D]; kv_cache: [num_blocks, Hkv, block_size, 2D]
        n = min(key.shape[0], slot_mapping.shape[0])
        lb = self.layer or (self.bind(layer.layer_name) if layer is not None else None)
        with phase(lb.layer if lb is not None else 0, "kv_write"):
            if n < key.shape[0] or n < slot_mapping.shape[0]:
                key, value, slot_mapping = key[:n], value[:n], slot_mapping[:n]
            if self._op_reads_cache(kv_cache) and key.dtype == kv_cache.dtype:  # vLLM's writer, no checks per call
                k_pages, v_pages = self._page_views(kv_cache)
                cpu_ops.write_pages(key, value, k_pages, v_pages, slot_mapping, self._cache_isa(kv_cache))
            else:
                write_kv(key, value, kv_cache, slot_mapping, self._cache_isa(kv_cache), sync_free=self.batched)
            if lb is not None and lb.quest_pages:
                summaries = self._page_summaries(layer, kv_cache)
                if summaries is not None and n:
                    update_page_summaries(summaries, key, slot_mapping, kv_cache.shape[2])

    def _page_summaries(self, layer, kv_cache: torch.Tensor) -> PageSummaries | None:
        """This layer's Quest summaries, made at its first write when some head decodes with
        page_topk: per unit of gcd(page sizes, block size) slots and KV head, the keys' min/max,
        in the cache's dtype (1/16 of the layer's KV bytes at 16-token pages, outside vLLM's budget)."""
        if self._summaries is not None and self._summaries[0] is kv_cache:
            return self._summaries[1]
        lb = self.layer or (self.bind(layer.layer_name) if layer is not None else None)
        pages = lb.quest_pages if lb is not None else ()
        if not pages or kv_cache.numel() == 0:
            return None
        nb, hkv, bs, d2 = kv_cache.shape
        summaries = PageSummaries.empty(nb, bs, math.gcd(*pages), hkv, d2 // 2, dtype=kv_cache.dtype,
                                        device=kv_cache.device)
        self._summaries = (kv_cache, summaries)
        return summaries

    # ------------------------------------------------------------------ forward
    def bind(self, layer_name: str) -> LayerBinding:
        self.layer = self.binding.for_layer(layer_index(layer_name))
        return self.layer

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: HeadwiseMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """query: ``[T, Hq, D]``; output: ``[T, Hq, D]`` written in place for the real tokens."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("headwise attention does not fuse output quantization")
        if attn_metadata is None:  # vLLM's profiling run: no cache yet
            return output
        lb = self.layer or self.bind(layer.layer_name)
        md = attn_metadata
        started = time.perf_counter()
        native = KERNELS["native_batch"]
        if md.batched is not None:
            self._forward_batched(lb, md, md.batched, query, kv_cache, output)
        elif (md.batch_dense is not None and native is not None and self._op_reads_cache(kv_cache)
                and (lb.prefill_dense or all(r.dense for r in md.prefill_rows))
                and (lb.decode_dense or md.decode_dense == md.num_decodes)):
            # every row of this layer is dense in this step: the one call stock vLLM makes
            n = md.num_actual_tokens
            with phase(lb.layer, "kernel"):
                native(query[:n], self._page_views(kv_cache), md.batch_dense, self.scale, output[:n])
        else:
            # [num_blocks, Hkv, block_size, D] strided views; an AMX-packed cache has none (no torch
            # kernel reads it in place: cpu_ops.cache_isa)
            vec = self._cache_isa(kv_cache) == cpu_ops.CACHE_ISA
            k_cache, v_cache = split_kv(kv_cache) if vec else (None, None)
            if md.num_decodes:
                self._decode(lb, md, query, kv_cache, k_cache, v_cache, output)
            for i, row in enumerate(md.prefill_rows):
                self._prefill(lb, md, i, row, query, kv_cache, k_cache, v_cache, output)
        rec = get_recorder()
        if rec is not None:
            rec.add_call(lb.layer, time.perf_counter() - started)
        return output

    def _forward_batched(self, lb: LayerBinding, md: HeadwiseMetadata, bw: BatchedWork, query, kv_cache,
                         output) -> None:
        """CUDA: one launch per kind of work. Order matters: FlashAttention over the rows this layer
        attends densely writes every row (zeros where it has no keys), then the sparse kernel writes
        its prefill rows, FlashAttention the dense KV groups' heads of every prefill row, and the
        decode kernel the decode rows."""
        k_cache, v_cache = split_kv(kv_cache)
        flash = KERNELS["flash"]
        dense_call = bw.flash_rows.get((lb.prefill_dense, lb.decode_dense)) if bw.flash else None
        if dense_call is not None:
            with phase(lb.layer, "kernel"):
                flash(query, kv_cache, dense_call, self.scale, output)
        if bw.layout is not None and not (bw.flash and lb.prefill_dense):
            index = bw.static.get(lb.prefill_group) if lb.prefill_group is not None else None
            if index is None:  # some head estimates from this layer's q and k
                index = self._batched_index(lb, md, bw, query, kv_cache)
            with phase(lb.layer, "kernel"):
                KERNELS["sparse_prefill_varlen_paged"](query, k_cache, v_cache, md.block_table, index,
                                                       scale=self.scale, out=output)
                if bw.flash and bw.flash_heads is not None:
                    group = len(lb.heads) // lb.num_local_kv_heads
                    for kv0, kv1 in lb.dense_kv_runs:
                        flash(query, kv_cache, bw.flash_heads, self.scale, output,
                              heads=slice(kv0 * group, kv1 * group), kv_heads=slice(kv0, kv1))
        if md.num_decodes and not (bw.flash and lb.decode_dense):
            self._decode(lb, md, query, kv_cache, k_cache, v_cache, output)

    def _batched_index(self, lb: LayerBinding, md: HeadwiseMetadata, bw: BatchedWork, query,
                       kv_cache) -> VarlenIndex:
        """The layer's index for every kernel row, estimated from this layer's q and the requests'
        cached keys, packed on the step's layout (kept pairs counted on the device)."""
        parts = []
        with phase(lb.layer, "index"):
            for row in bw.rows:
                k_full = None if row.dense else read_kv(kv_cache, md.block_table[row.req], row.seq_len,
                                                        keys_only=True)[0]
                parts.append(runner.prefill_index(lb, self.binding.settings, query[row.start:row.end], k_full,
                                                  row.q_offset, row.total_len, self.scale, cache=md.step_cache,
                                                  ends_prompt=row.ends_prompt))
            rec = get_recorder()
            if rec is not None:  # rows FlashAttention ran (dense rows) keep every pair
                full = bw.flash_row_pairs * len(lb.heads)
                rec.add_keys_tensor(lb.layer, PREFILL, sum(kept_pairs(p) for p in parts) + full,
                                    sum(r.causal_pairs for r in bw.rows) * len(lb.heads) + full)
            if bw.flash and lb.dense_kv_runs:
                keep = lb.on("dense_run_mask", query.device)
                parts = [runner.without_heads(p, keep) for p in parts]
            return VarlenIndex.pack(parts, layout=bw.layout)

    def _decode(self, lb: LayerBinding, md: HeadwiseMetadata, query, kv_cache, k_cache, v_cache, output) -> None:
        q = query[md.decode_tokens]  # [Bd, Hq, D]
        native = KERNELS["native_batch"]
        op_ok = native is not None and md.decode_dense_op is not None and self._op_reads_cache(kv_cache)
        if lb.decode_dense and op_ok:
            # a dense layer needs no selection: straight to vLLM's op (stats: recorded by the builder)
            with phase(lb.layer, "kernel"):
                output[md.decode_tokens] = native(q, self._page_views(kv_cache), md.decode_dense_op, self.scale)
            return
        if op_ok and lb.decode_on_op and md.batched is None:
            # sink + window heads on vLLM's op over the pages they keep: planned once per step for the
            # layers that share these decode specs (the selection depends on lengths only)
            key = ("decode_op", lb.decode_group)
            schedule = md.step_cache.get(key)
            if schedule is None:
                with phase(lb.layer, "select"):
                    sel = runner.decode_selection(lb, self.binding.settings, q, None, md.decode_block_table,
                                                  md.decode_seq_lens, md.decode_total_lens, self.scale)
                    schedule = md.step_cache[key] = cpu_ops.plan_decode(
                        sel, md.decode_seq_lens, md.decode_block_table, kv_cache.shape[2], len(lb.heads),
                        self.num_kv_heads, self.head_size, kv_cache.dtype, self._cache_isa(kv_cache))
            with phase(lb.layer, "kernel"):
                output[md.decode_tokens] = native(q, self._page_views(kv_cache), schedule, self.scale)
            rec = get_recorder()
            if rec is not None:
                rec.add_keys(lb.layer, DECODE, schedule.kept_pairs, schedule.causal_pairs)
            return
        summaries = self._summaries[1] if self._summaries is not None and self._summaries[0] is kv_cache else None
        with phase(lb.layer, "select"):
            sel = runner.decode_selection(lb, self.binding.settings, q, k_cache, md.decode_block_table,
                                          md.decode_seq_lens, md.decode_total_lens, self.scale, md.tidal,
                                          page_summaries=summaries,
                                          max_seq_len=md.max_seq_len if md.batched is not None else None)
            every_token = op_ok and bool((sel.mode == int(DecodeMode.DENSE)).all())  # every row reads every token
        with phase(lb.layer, "kernel"):
            if every_token:
                out = native(q, self._page_views(kv_cache), md.decode_dense_op, self.scale)
            else:
                out = runner.run_decode(q, k_cache, v_cache, md.decode_block_table, md.decode_seq_lens, sel,
                                        self.scale)
            output[md.decode_tokens] = out
        rec = get_recorder()
        if rec is not None:
            kept = runner.decode_kept(lb, sel, md.decode_seq_lens)
            causal = md.decode_seq_lens.long().sum() * len(lb.heads)
            if q.device.type == "cpu" and md.batched is None:
                rec.add_keys(lb.layer, DECODE, int(kept), int(causal))
            else:  # no host sync per layer on a GPU: folded in once per step
                rec.add_keys_tensor(lb.layer, DECODE, kept, causal)

    def _prefill(self, lb: LayerBinding, md: HeadwiseMetadata, i: int, row: PrefillRow, query, kv_cache, k_cache,
                 v_cache, output) -> None:
        q = query[row.start:row.end]  # [Tq, Hq, D]
        table_row = md.block_table[row.req]
        work = md.static.get((lb.prefill_group, i)) if lb.prefill_group is not None else None
        if work is None:  # some head estimates its index from this layer's q and k
            k_full = None
            if not row.dense:
                with phase(lb.layer, "copy"):
                    k_full, _ = read_kv(kv_cache, table_row, row.seq_len, keys_only=True,
                                        isa=self._cache_isa(kv_cache))  # [S, Hkv, D]
            with phase(lb.layer, "index"):
                index = runner.prefill_index(lb, self.binding.settings, q, k_full, row.q_offset, row.total_len,
                                             self.scale, cache=md.step_cache, ends_prompt=row.ends_prompt)
                op = self._op_target(kv_cache) if KERNELS["native_batch"] is not None else None
                work = prefill_work(index, table_row, row, len(lb.heads), op)
            rec = get_recorder()
            if rec is not None:
                rec.add_keys(lb.layer, PREFILL, work.kept_pairs, work.causal_pairs)
        native = KERNELS["native_batch"]
        with phase(lb.layer, "kernel"):
            if work.schedule is not None and native is not None and self._op_reads_cache(kv_cache):
                output[row.start:row.end] = native(q, self._page_views(kv_cache), work.schedule, self.scale)
            else:
                output[row.start:row.end] = runner.run_prefill_paged(q, k_cache, v_cache, table_row, work.index,
                                                                     self.scale)

    def _page_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The op's K/V page views of this layer's cache, made once (the cache tensor is persistent)."""
        views = self._views
        if views is None or views[0] is not kv_cache:
            views = self._views = (kv_cache, *cpu_ops.page_views(kv_cache))
        return views[1], views[2]

    def _op_target(self, kv_cache: torch.Tensor) -> OpTarget | None:
        if not self._op_reads_cache(kv_cache):
            return None
        return OpTarget(kv_cache.shape[2], self.num_kv_heads, self.head_size, kv_cache.dtype,
                        self._cache_isa(kv_cache))

    def _cache_isa(self, kv_cache: torch.Tensor) -> str:
        """The op layout of this layer's cache: the builder's rule (``cpu_ops.cache_isa``) on the same
        inputs, so the writer, the op schedules and the readers agree."""
        if self._isa is None:
            self._isa = cpu_ops.cache_isa(kv_cache.dtype, kv_cache.shape[2], self.head_size,
                                          self.binding.torch_reads_pages) \
                if self._op_reads_cache(kv_cache) else cpu_ops.CACHE_ISA
        return self._isa

    def _op_reads_cache(self, kv_cache: torch.Tensor) -> bool:
        if self._cache_ok is None:
            self._cache_ok = cpu_ops.cache_readable(kv_cache)
        return self._cache_ok
