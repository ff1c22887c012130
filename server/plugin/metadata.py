"""The per-step metadata of the headwise backend and the step planner that builds it.

``HeadwiseMetadataBuilder.build`` runs once per scheduler step (host side) and turns vLLM's
``CommonAttentionMetadata`` into a ``HeadwiseMetadata`` shared by every layer of the step:

* rows are split into *decode rows* (one new token of a request past its prompt; attended as one
  batched call) and *prefill rows* (a chunk of prompt tokens, attended per request over the whole
  sequence read from the paged cache). vLLM reorders rows of one token to the front
  (``reorder_batch_threshold = 1``), but a one-token *prompt* chunk lands there too: it is told
  apart by ``is_prefilling`` (or, when vLLM does not give it, by an empty context);
* per-request lengths, block-table rows and the dense-fallback decision (``dense_below``);
* the *static work* of the step: for every prefill row and every group of layers whose heads all
  use position-only patterns (dense, A-shape, strided, MoA windows), the ``SparseIndex`` and, on
  CPU, vLLM's op schedule over the real cache pages (``cpu_ops``), built here once and shared by
  every layer of the group (``PrefillWork``, looked up by ``LayerBinding.prefill_group``);
* on CPU, one op schedule for the whole batch (``batch_dense``): a layer whose rows are all dense
  in this step makes the very call stock vLLM makes; and one for the decode rows alone;
* the stats of everything decided here (static layers' kept/causal pairs, request counts),
  recorded once per step, not per layer;
* the persistent TidalDecode buffer (allocated once per worker; select layers write it, later
  layers of the same step read it).

``HeadwiseImpl`` (``impl.py``) runs per layer over this metadata; ``backend.py`` registers both.

On CUDA (``batched``) the step is planned for one launch per layer instead (``cuda_step``): the
sparse prefill rows of every layer run as one varlen launch of the sparse kernel (the static
groups' packed indices built here; estimated ones packed per layer on the step's ``VarlenLayout``),
and dense rows, dense layers and heads whose whole GQA group is dense run on vLLM's FlashAttention
(``cuda_ops.FlashCall``, made here) where it runs the cache's dtype.

CUDA graphs: a decode-only step is captured when every layer decodes densely on FlashAttention
(``get_cudagraph_support``: the call reads vLLM's persistent buffers); otherwise the builder
declares ``NEVER`` and vLLM captures the rest of the model piecewise, running attention eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata

from headwise.kernels.index import SparseIndex
from headwise.patterns.prefill import build_layer_prefill_index
from headwise.patterns.ranges import fast_density
from headwise.patterns.tidal import TidalState

from . import cpu_ops, cuda_ops, cuda_step, pages, runner
from .plan_binding import LayerBinding, PlanBinding, worker_binding
from .stats import StatsRecorder, init_recorder, stats_dir_from_env
from .timing import step_phase

_LOG = init_logger("vllm.headwise")
PREFILL, DECODE = 0, 1  # stats phases


# ------------------------------------------------------------------------------- metadata
@dataclass
class PrefillRow:
    """One request's prompt chunk in this step."""

    req: int  # row in the batch (block_table row)
    start: int  # first query token in the step's flattened tokens
    end: int
    q_offset: int  # tokens already in the cache before this chunk (context / prefix-cache hit)
    seq_len: int  # q_offset + chunk length
    total_len: int  # seq_len + planned generation: MoA spans grow with it
    dense: bool  # below the plan's dense_below: attended densely
    ends_prompt: bool = True  # holds the prompt's last token: its last queries get the plan's dense tail

    @property
    def q_len(self) -> int:
        return self.end - self.start

    @property
    def causal_pairs(self) -> int:
        """(query, key) pairs of dense causal attention for this chunk, per head."""
        return self.q_len * self.q_offset + self.q_len * (self.q_len + 1) // 2


@dataclass
class PrefillWork:
    """A prefill row's index for one group of layers, and (on CPU) its op schedule over the cache."""

    index: SparseIndex
    schedule: cpu_ops.OpSchedule | None  # None: the torch kernel runs it
    kept_pairs: int  # pairs attended over the local heads (page-rounded when the op runs it)
    causal_pairs: int


@dataclass(frozen=True)
class OpTarget:
    """What vLLM's CPU op needs to know of the cache it reads: page size, KV heads, head dim, dtype,
    and the code path whose page layout the cache keeps (``cpu_ops.cache_isa``)."""

    page: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    isa: str = cpu_ops.CACHE_ISA


def prefill_work(index: SparseIndex, block_row: torch.Tensor, row: PrefillRow, num_heads: int,
                 op: OpTarget | None) -> PrefillWork:
    """An index's work: its op schedule over the request's pages ``block_row`` when the op reads the
    cache (``op``; kept pairs page-rounded), else the torch kernel's (kept pairs exact)."""
    causal = row.causal_pairs * num_heads
    if op is not None and index.device.type == "cpu":
        schedule = cpu_ops.plan_prefill(index, block_row, op.page, op.num_kv_heads, op.head_dim, op.dtype, op.isa,
                                        merge=pages.block_merge(op.page, index.block_m))
        return PrefillWork(index, schedule, schedule.kept_pairs, causal)
    dens = 1.0 if row.dense else fast_density(index)
    return PrefillWork(index, None, round(dens * causal), causal)


@dataclass
class HeadwiseMetadata:
    num_actual_tokens: int
    block_table: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] (-1 = padding)
    dense_below: int
    # decode rows: one token each, attended in one batched call
    num_decodes: int
    decode_tokens: torch.Tensor | slice  # token rows of the decodes in query/output
    decode_seq_lens: torch.Tensor  # [Bd] int32, current token included
    decode_total_lens: torch.Tensor  # [Bd] int32
    decode_block_table: torch.Tensor  # [Bd, max_blocks] int32
    decode_dense: int  # decode rows below dense_below (stats)
    prefill_rows: list[PrefillRow]
    tidal: TidalState | None = None
    # (prefill group, row number) -> the row's work for every layer of that group (equal signatures)
    static: dict[tuple[int, int], PrefillWork] = field(default_factory=dict)
    batch_dense: cpu_ops.OpSchedule | None = None  # CPU: the whole batch, dense, as stock runs it
    decode_dense_op: cpu_ops.OpSchedule | None = None  # CPU: the decode rows alone, dense
    all_rows_dense: bool = False  # every prefill row below dense_below and every decode row too
    step_cache: dict = field(default_factory=dict)  # per-step scratch shared by layers (dynamic work)
    step: int = 0
    batched: cuda_step.BatchedWork | None = None  # CUDA: one launch per layer (None: the per-row CPU path)
    max_seq_len: int | None = None  # the engine's max model length: fixed selection shapes


# -------------------------------------------------------------------------------- builder
class HeadwiseMetadataBuilder(AttentionMetadataBuilder[HeadwiseMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold: int | None = 1

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """Decode-only steps are capturable on CUDA when every layer decodes densely and
        FlashAttention runs the cache (``plan_binding.CAPTURABLE_DECODE``); else ``NEVER``."""
        try:
            from vllm.platforms import current_platform

            if not current_platform.is_cuda():
                return AttentionCGSupport.NEVER
            binding = worker_binding()
        except Exception:  # no plan or platform reachable here: claim nothing
            return AttentionCGSupport.NEVER
        return cls.cudagraph_support_for(binding, kv_cache_spec.dtype, kv_cache_spec.head_size)

    @staticmethod
    def cudagraph_support_for(binding: PlanBinding, dtype: torch.dtype, head_dim: int) -> AttentionCGSupport:
        if binding.decode_capturable and cuda_ops.supports(dtype, head_dim):
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, binding: PlanBinding | None = None,
                 batched: bool | None = None):
        """``batched``: plan one launch per layer (default: on CUDA; tests set it on CPU)."""
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.binding = binding or worker_binding()
        settings = self.binding.settings
        self.dense_below = settings.dense_below
        self.planned_generation = settings.planned_generation
        self.block_size = kv_cache_spec.block_size
        top_k = self.binding.plan.max_tidal_top_k()
        max_batch = vllm_config.scheduler_config.max_num_seqs
        # Allocated once: select layers write it in place every step, so its address never changes.
        self.tidal = TidalState(max_batch, self.binding.local_heads, top_k, device) if top_k else None
        self.recorder: StatsRecorder = init_recorder(
            num_layers=self.binding.num_layers, stats_dir=_stats_dir(vllm_config),
            rank=self.binding.tp_rank, tp_size=self.binding.tp_size, plan=self.binding.plan_path,
            device=str(torch.device(device).type))
        self._step = 0
        self._runner = _model_runner()
        self.device = torch.device(device)
        self.dtype = kv_cache_spec.dtype
        self.head_dim = kv_cache_spec.head_size
        # vLLM's op reads the real cache (CPU, pages of a multiple of 32 tokens, a dtype it runs)
        self.batched = self.device.type == "cuda" if batched is None else batched
        self.flash = (self.batched and runner.KERNELS["flash"] is not None
                      and cuda_ops.available(self.dtype, self.head_dim))
        model_config = getattr(vllm_config, "model_config", None)
        self.max_seq_len = getattr(model_config, "max_model_len", None)
        self.use_op = (not self.batched and self.device.type == "cpu" and self.block_size % 32 == 0
                       and cpu_ops.available(self.dtype, self.head_dim))
        self.op = OpTarget(self.block_size, self.binding.local_kv_heads, self.head_dim, self.dtype,
                           cpu_ops.cache_isa(self.dtype, self.block_size, self.head_dim,
                                             self.binding.torch_reads_pages)) if self.use_op else None
        # one representative layer per prefill signature: static groups are built once per step
        layers = [self.binding.for_layer(i) for i in range(self.binding.num_layers)]
        self.groups: dict[int, list[LayerBinding]] = {}
        for lb in layers:
            if lb.prefill_group is not None:
                self.groups.setdefault(lb.prefill_group, []).append(lb)
        self.decode_dense_layers = [lb.layer for lb in layers if lb.decode_dense]
        _log_active(self.binding, self.block_size, device)
        if self.binding.settings.dense_tail and self._prompt_lens(0) is None:
            _LOG.warning("headwise: no model runner found: prompt lengths unknown, so every prefill chunk gets "
                         "the plan's dense tail (dense_tail %d), not only the chunk that ends the prompt",
                         self.binding.settings.dense_tail)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HeadwiseMetadata:
        with step_phase("plan"):
            return self._build(common_attn_metadata)

    def _build(self, cm: CommonAttentionMetadata) -> HeadwiseMetadata:
        self.recorder.flush_device()
        b = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: b + 1].long()
        seq_lens_cpu = getattr(cm, "seq_lens_cpu_upper_bound", None)
        seq_lens_cpu = (cm.seq_lens if seq_lens_cpu is None else seq_lens_cpu)[:b].cpu().long()
        q_lens = qsl[1:] - qsl[:-1]
        context = seq_lens_cpu - q_lens
        prefilling = getattr(cm, "is_prefilling", None)
        if prefilling is not None:
            prefilling = prefilling[:b].cpu().bool()
        else:  # without vLLM's flag, only an empty context proves a one-token row is a prompt
            prefilling = context == 0
        is_prefill = (q_lens > 1) | ((q_lens == 1) & prefilling)
        is_decode = (q_lens == 1) & ~is_prefill

        dec = torch.nonzero(is_decode).squeeze(1)
        nd = int(dec.numel())
        seq_lens_dev = cm.seq_lens[:b]
        block_table = cm.block_table_tensor[:b]
        if nd and int(dec[-1]) == nd - 1:  # the usual case after vLLM's reorder: rows [0, nd)
            decode_tokens: torch.Tensor | slice = slice(int(qsl[0]), int(qsl[nd]))
            d_seq = seq_lens_dev[:nd]
            d_table = block_table[:nd]
        else:
            decode_tokens = qsl[dec].to(cm.query_start_loc.device)
            d_idx = dec.to(seq_lens_dev.device)
            d_seq, d_table = seq_lens_dev[d_idx], block_table[d_idx]
        d_seq = d_seq.to(torch.int32)
        decode_dense = int((seq_lens_cpu[dec] < self.dense_below).sum()) if nd else 0

        prompt_lens = self._prompt_lens(b)
        rows = []
        for r in torch.nonzero(is_prefill).squeeze(1).tolist():
            s = int(seq_lens_cpu[r])
            rows.append(PrefillRow(req=r, start=int(qsl[r]), end=int(qsl[r + 1]), q_offset=int(context[r]),
                                   seq_len=s, total_len=s + self.planned_generation, dense=s < self.dense_below,
                                   ends_prompt=prompt_lens is None or s >= int(prompt_lens[r])))
        if _LOG.isEnabledFor(logging.DEBUG):
            _LOG.debug("headwise: step %d: %d decode rows, prefill chunks (q_offset, q_len) %s", self._step + 1,
                       nd, [(r.q_offset, r.q_len) for r in rows])
        n_dense_pre = sum(r.dense for r in rows)
        batched = None
        if self.batched:
            batched, pairs = cuda_step.plan(rows, cm, is_decode, self.binding, self.groups, self.flash,
                                            self.dense_below, self.device, self.max_seq_len)
            md_static = {}
        else:
            md_static = self._static_work(rows, block_table)
            pairs = {sig: (sum(md_static[(sig, i)].kept_pairs for i in range(len(rows))),
                           sum(md_static[(sig, i)].causal_pairs for i in range(len(rows))))
                     for sig in self.groups} if rows else {}
        batch_dense = decode_op = None
        if self.use_op:
            h, hkv = self.binding.local_heads, self.binding.local_kv_heads
            batch_dense = cpu_ops.plan_batch(qsl, cm.seq_lens[:b].cpu(), block_table, h, hkv, self.head_dim, self.dtype,
                                             self.op.isa)
            if nd and not rows:  # a decode-only step: the batch is the decode rows
                decode_op = batch_dense
            elif nd:
                decode_op = cpu_ops.plan_batch(torch.arange(nd + 1), d_seq.cpu(), d_table, h, hkv, self.head_dim,
                                               self.dtype, self.op.isa)
        self._record_static(pairs, d_seq if nd else None)
        self.recorder.add_step(
            prefill_tokens=sum(r.q_len for r in rows), decode_tokens=nd,
            prefill_sparse=len(rows) - n_dense_pre, prefill_dense=n_dense_pre,
            decode_sparse=nd - decode_dense, decode_dense=decode_dense)
        self._step += 1
        return HeadwiseMetadata(
            num_actual_tokens=cm.num_actual_tokens, block_table=block_table, slot_mapping=cm.slot_mapping,
            dense_below=self.dense_below, num_decodes=nd, decode_tokens=decode_tokens,
            decode_seq_lens=d_seq, decode_total_lens=d_seq + self.planned_generation,
            decode_block_table=d_table, decode_dense=decode_dense, prefill_rows=rows,
            tidal=self.tidal, static=md_static, batch_dense=batch_dense, decode_dense_op=decode_op,
            all_rows_dense=all(r.dense for r in rows) and decode_dense == nd, step=self._step,
            batched=batched, max_seq_len=self.max_seq_len)

    def _prompt_lens(self, num_reqs: int) -> torch.Tensor | None:
        """Each row's prompt length, read from the model runner's input batch (vLLM's
        ``CommonAttentionMetadata`` does not carry it; the rows are the batch's first ``num_reqs``
        requests in order). None when no runner built this builder (tests, other hosts): every
        chunk then counts as ending its prompt (a dense tail too many, never one too few)."""
        batch = getattr(self._runner, "input_batch", None)
        lens = getattr(batch, "num_prompt_tokens_cpu_tensor", None)
        return None if lens is None else lens[:num_reqs]

    # ------------------------------------------------------------------ static work
    def _static_work(self, rows: list[PrefillRow], block_table: torch.Tensor) -> dict[tuple[int, int], PrefillWork]:
        """Index (and op schedule) of every prefill row for every static layer group: once per step."""
        settings = self.binding.settings
        work: dict[tuple, PrefillWork] = {}
        cache: dict = {}  # layers of different groups may still share a family's index
        for sig, group in self.groups.items():
            lb = group[0]
            for i, row in enumerate(rows):
                index = build_layer_prefill_index(
                    lb.prefill_specs, lb.heads, lb.num_layer_heads, None, None, lb.kv_heads, row.q_offset,
                    row.total_len, settings.block_size, q_len=row.q_len, num_layer_kv_heads=lb.num_layer_kv_heads,
                    dense_below=self.dense_below, dense_tail=settings.dense_tail if row.ends_prompt else 0,
                    cache=cache)
                work[(sig, i)] = prefill_work(index, block_table[row.req], row, len(lb.heads), self.op)
        return work

    def _record_static(self, pairs: dict[int, tuple[int, int]], d_seq) -> None:
        """Kept/causal pairs of the static prefill layers and dense decode layers, once per step."""
        rec = self.recorder
        for sig, (kept, causal) in pairs.items():
            if causal:
                for lb in self.groups[sig]:
                    rec.add_keys(lb.layer, PREFILL, kept, causal)
        if d_seq is not None and self.decode_dense_layers:
            causal = int(d_seq.long().sum()) * self.binding.local_heads
            for layer in self.decode_dense_layers:
                rec.add_keys(layer, DECODE, causal, causal)


def _model_runner():
    """vLLM's model runner building this builder, found up the call stack (it owns ``input_batch``
    and ``attn_groups``), or None: vLLM hands builders no reference to it, and only its input batch
    knows where each request's prompt ends."""
    import inspect

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if owner is not None and hasattr(owner, "input_batch") and hasattr(owner, "attn_groups"):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def _log_active(binding: PlanBinding, block_size: int, device) -> None:
    _LOG.info(
        "headwise: attention backend active: plan %s, rank %d/%d (query heads %d-%d), KV block size %d, "
        "device %s", binding.plan_path, binding.tp_rank, binding.tp_size, binding.heads[0], binding.heads[-1],
        block_size, device)


def _stats_dir(vllm_config) -> str | None:
    extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
    section = extra.get("headwise") or {}
    return section.get("stats_dir") or stats_dir_from_env()
