"""The per-step metadata of the headwise backend and the step planner that builds it.

``HeadwiseMetadataBuilder.build`` runs once per scheduler step (host side) and turns vLLM's
``CommonAttentionMetadata`` into a ``HeadwiseMetadata`` shared by every layer of the step:

* rows are split into *decode rows* (one new token of a request past its prompt; attended as one
  batched call) and *prefill rows* (a chunk of prompt tokens, attended per request over the whole
  sequence read from the paged cache). vLLM reorders rows of one token to the front
  (``reorder_batch_threshold = 1``), but a one-token *prompt* chunk lands there too: it is told
  apart by ``is_prefilling`` (or, when vLLM does not give it, by an empty context);
* per-request lengths, block-table rows and the dense-fallback decision (``dense_below``);
* ``step_cache``, where layers sharing a static prefill pattern find the index built by the
  first of them (built once per step, shared by layers);
* the persistent TidalDecode buffer (allocated once per worker; select layers write it, later
  layers of the same step read it).

``HeadwiseImpl`` (``impl.py``) runs per layer over this metadata; ``backend.py`` registers both.

CUDA graphs: the impl does host work per layer (index building, Python control flow over prefill
rows), so the builder declares ``NEVER``: vLLM then captures the rest of the model piecewise and
runs attention eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata

from headwise.patterns.tidal import TidalState

from .plan_binding import PlanBinding, worker_binding
from .stats import StatsRecorder, init_recorder, stats_dir_from_env

_LOG = init_logger("vllm.headwise")


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

    @property
    def q_len(self) -> int:
        return self.end - self.start


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
    step_cache: dict = field(default_factory=dict)  # static prefill indices (and their densities)
    step: int = 0


# -------------------------------------------------------------------------------- builder
class HeadwiseMetadataBuilder(AttentionMetadataBuilder[HeadwiseMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold: int | None = 1

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, binding: PlanBinding | None = None):
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
        _log_active(self.binding, self.block_size, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HeadwiseMetadata:
        cm = common_attn_metadata
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

        rows = []
        for r in torch.nonzero(is_prefill).squeeze(1).tolist():
            s = int(seq_lens_cpu[r])
            rows.append(PrefillRow(req=r, start=int(qsl[r]), end=int(qsl[r + 1]), q_offset=int(context[r]),
                                   seq_len=s, total_len=s + self.planned_generation, dense=s < self.dense_below))
        if _LOG.isEnabledFor(logging.DEBUG):
            _LOG.debug("headwise: step %d: %d decode rows, prefill chunks (q_offset, q_len) %s", self._step + 1,
                       nd, [(r.q_offset, r.q_len) for r in rows])
        n_dense_pre = sum(r.dense for r in rows)
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
            tidal=self.tidal, step=self._step)


def _log_active(binding: PlanBinding, block_size: int, device) -> None:
    _LOG.info(
        "headwise: attention backend active: plan %s, rank %d/%d (query heads %d-%d), KV block size %d, "
        "device %s", binding.plan_path, binding.tp_rank, binding.tp_size, binding.heads[0], binding.heads[-1],
        block_size, device)


def _stats_dir(vllm_config) -> str | None:
    extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
    section = extra.get("headwise") or {}
    return section.get("stats_dir") or stats_dir_from_env()
