"""From a plan file to the specs each attention layer of this worker runs.

* ``resolve_plan_path``: where the plan comes from (``--additional-config`` first, then
  ``$HEADWISE_PLAN``).
* ``validate_plan_for_model``: load + check against a checkpoint's geometry and a tensor-parallel
  size, in the API process *before* any engine starts (so a mismatch leaves nothing behind).
* ``PlanBinding``: the plan as one worker sees it: its tensor-parallel rank owns a contiguous
  slice of query heads (and of KV heads); ``for_layer(i)`` gives that slice's specs for layer
  ``i``, computed once and cached.
* ``worker_binding()``: the process-wide binding built from vLLM's current config, validated
  against the model vLLM is loading; inside the engine a bad plan raises ``PlanError`` here.

Plans are written per *global* head; everything local to a rank is derived here and nowhere else.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from headwise.server import env
from headwise.patterns.plan import Plan, load_plan
from headwise.patterns.plan_errors import PlanError, PlanIssue
from headwise.patterns.prefill import is_static

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def resolve_plan_path(additional_config: dict | None) -> str:
    """The plan path: ``additional_config["headwise"]["plan"]``, else ``$HEADWISE_PLAN``."""
    section = (additional_config or {}).get("headwise") or {}
    path = section.get("plan") if isinstance(section, dict) else None
    path = path or env.plan_path()
    if not path:
        raise PlanError(PlanIssue(
            "$", "a plan path in --additional-config '{\"headwise\": {\"plan\": \"...\"}}' or $HEADWISE_PLAN",
            "neither is set (headwise is enabled by HEADWISE_ENABLE=1 but has no plan)"), file="<no plan>")
    return str(path)


def check_tensor_parallel(plan: Plan, tp_size: int) -> None:
    """Heads must split evenly over the ranks (vLLM's rule); KV heads split or replicate."""
    m = plan.model
    if tp_size < 1 or m.num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} does not divide the plan's {m.num_heads} query heads "
                         f"({plan.source or '<plan>'}); expected a divisor of {m.num_heads}")
    if m.num_kv_heads % tp_size and tp_size % m.num_kv_heads:
        raise ValueError(f"tensor_parallel_size {tp_size} neither divides nor is a multiple of the plan's "
                         f"{m.num_kv_heads} KV heads ({plan.source or '<plan>'})")


def validate_plan_for_model(plan_path: str | os.PathLike, model_path: str, tensor_parallel_size: int = 1) -> Plan:
    """Load ``plan_path`` and check it fits ``model_path`` (a HF checkpoint directory or hub id).

    Raises ``PlanError`` (bad file, bad pattern, geometry mismatch: the message names the file,
    the field, what was expected and what was found) or ``ValueError`` (heads do not split over
    ``tensor_parallel_size``). Starts nothing.
    """
    plan = load_plan(plan_path)
    geo = read_geometry(model_path)
    plan.check_geometry(geo["num_layers"], geo["num_heads"], geo["num_kv_heads"], geo["head_dim"],
                        source=f"model {model_path}")
    check_tensor_parallel(plan, tensor_parallel_size)
    return plan


class GeometryError(ValueError):
    """A model's attention geometry could not be read (no config.json, missing fields)."""


def read_geometry(model: str) -> dict:
    """Attention geometry of a HF checkpoint directory (or hub id) from its config.json."""
    path = Path(model)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise GeometryError(f"{path} has no config.json")
        cfg = json.loads(cfg_file.read_text())
    else:
        from transformers import AutoConfig  # hub ids: let transformers find it in the HF cache

        cfg = AutoConfig.from_pretrained(model).to_dict()
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    return {
        "architecture": (cfg.get("architectures") or ["unknown"])[0],
        "num_layers": cfg["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "max_position_embeddings": cfg.get("max_position_embeddings"),
    }


def layer_index(layer_name: str) -> int:
    """``model.layers.3.self_attn.attn`` -> 3."""
    m = _LAYER_RE.search(layer_name)
    if m is None:
        raise ValueError(f"headwise: cannot find the layer number in attention layer name {layer_name!r}; "
                         f"expected a name containing 'layers.<n>.'")
    return int(m.group(1))


@dataclass(frozen=True)
class LayerBinding:
    """One layer's plan, restricted to this rank's heads.

    heads:    global query-head ids served here (contiguous), one per local head.
    kv_heads: ``[H_local]`` long, the *local* KV head each local query head reads.
    """

    layer: int
    heads: list[int]
    kv_heads: torch.Tensor
    num_layer_heads: int
    num_layer_kv_heads: int
    prefill_specs: list[Any]
    decode_specs: list[Any]
    num_local_kv_heads: int
    # layers with equal ``prefill_signature`` share this small id (the step plan's key: hashing the
    # specs themselves on every lookup cost ~0.3 ms per step for a 30-layer per-head plan)
    prefill_group: int | None = None
    decode_group: int = 0  # layers with equal decode specs share this id (a step plans their op calls once)

    @cached_property
    def _on_device(self) -> dict:
        return {}

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        """``kv_heads``, ``decode_group_heads`` or ``dense_run_mask`` on ``device``, copied once: a
        host-to-device copy in the per-layer path would wait for the device on CUDA."""
        key = (name, str(device))
        t = self._on_device.get(key)
        if t is None:
            t = self._on_device[key] = getattr(self, name).to(device)
        return t

    @cached_property
    def dense_run_mask(self) -> torch.Tensor:
        """``[H_local, 1]`` int32: 0 for the query heads of ``dense_kv_runs``, else 1."""
        group = len(self.heads) // self.num_local_kv_heads
        keep = torch.ones(len(self.heads), 1, dtype=torch.int32)
        for kv0, kv1 in self.dense_kv_runs:
            keep[kv0 * group:kv1 * group] = 0
        return keep

    @cached_property
    def prefill_dense(self) -> bool:
        return all(s.type == "dense" for s in self.prefill_specs)

    @cached_property
    def prefill_dynamic(self) -> bool:
        """Some head estimates its index from q and k (needs the request's keys gathered)."""
        return any(not is_static(s) for s in self.prefill_specs)

    @cached_property
    def prefill_signature(self) -> tuple | None:
        """The layer's specs when every head's prefill index depends on positions only (layers with
        equal signatures share one index per row, built once per step), else None."""
        if not all(is_static(s) for s in self.prefill_specs):
            return None
        return tuple(self.prefill_specs)

    @cached_property
    def decode_dense(self) -> bool:
        return all(s.type == "dense" for s in self.decode_specs)

    @cached_property
    def decode_group_heads(self) -> torch.Tensor | None:
        """One local head per KV group when every head of each group selects the same tokens, else
        None. The decode kernel then gathers each selected K/V row once per group, not per head.
        Per-head dynamic selections (Quest pages, a TidalDecode reuse of per-head picks) differ."""
        group = len(self.heads) // self.num_local_kv_heads
        for g in range(0, len(self.heads), group):
            specs = self.decode_specs[g:g + group]
            if any(s != specs[0] for s in specs):
                return None
            if specs[0].type == "page_topk" or (specs[0].type == "tidal" and specs[0].role == "reuse"):
                return None
        return torch.arange(0, len(self.heads), group)

    @cached_property
    def dense_kv_runs(self) -> tuple[tuple[int, int], ...]:
        """Runs ``[kv0, kv1)`` of local KV heads whose every query head prefills densely, in a layer
        that is not dense as a whole: on CUDA those heads run on FlashAttention, not the sparse kernel
        (their query heads are ``[kv0 * group, kv1 * group)``)."""
        if self.prefill_dense:
            return ()
        group = len(self.heads) // self.num_local_kv_heads
        dense = [all(s.type == "dense" for s in self.prefill_specs[g * group:(g + 1) * group])
                 for g in range(len(self.heads) // group)]
        runs, start = [], None
        for g, d in enumerate(dense + [False]):
            if d and start is None:
                start = g
            elif not d and start is not None:
                runs.append((start, g))
                start = None
        return tuple(runs)

    @cached_property
    def decode_on_op(self) -> bool:
        """Every head decodes densely or with a sink + window: vLLM's CPU op runs the layer's decode
        rows over the pages those keep (``cpu_ops.plan_decode``), no torch kernel reads the cache."""
        return all(s.type in OP_DECODE for s in self.decode_specs)

    @cached_property
    def quest_pages(self) -> tuple[int, ...]:
        """Page sizes of the heads that decode with Quest (``page_topk``): their cache keeps summaries."""
        return tuple(s.page_size for s in self.decode_specs if s.type == "page_topk")

    @cached_property
    def tidal_select(self) -> bool:
        return any(s.type == "tidal" and s.role == "select" for s in self.decode_specs)


class PlanBinding:
    """The plan as one tensor-parallel rank serves it (local heads ``[rank*H/tp, (rank+1)*H/tp)``)."""

    def __init__(self, plan: Plan, tp_rank: int = 0, tp_size: int = 1, plan_path: str | None = None):
        check_tensor_parallel(plan, tp_size)
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tensor-parallel rank {tp_rank} outside [0, {tp_size})")
        self.plan = plan
        self.plan_path = plan_path or plan.source
        self.tp_rank, self.tp_size = tp_rank, tp_size
        m = plan.model
        self.num_layers = m.num_layers
        self.num_heads, self.num_kv_heads, self.head_dim = m.num_heads, m.num_kv_heads, m.head_dim
        self.local_heads = m.num_heads // tp_size
        # vLLM replicates KV heads when there are more ranks than KV heads: one per rank then
        self.local_kv_heads = max(1, m.num_kv_heads // tp_size)
        self._layers: dict[int, LayerBinding] = {}
        self._groups: dict[tuple, int] = {}  # prefill signature -> group id
        self._decode_groups: dict[tuple, int] = {}  # decode specs -> group id

    @property
    def settings(self):
        return self.plan.settings

    @property
    def heads(self) -> list[int]:
        start = self.tp_rank * self.local_heads
        return list(range(start, start + self.local_heads))

    @property
    def coarse_pages(self) -> bool:
        """Every head prefills with a sink/window pattern or densely and decodes densely: such a plan
        loses little when vLLM's op reads whole 128-token blocks instead of 32-token pages (the
        A-shape's page-rounded window grows, its op time does not: ``cpu_ops``), and its dense work
        then runs on the page size stock runs. Estimated and strided patterns keep fine pages."""
        return all(s.type in COARSE_PREFILL for i in range(self.num_layers) for s in self.for_layer(i).prefill_specs) \
            and not self.torch_reads_pages

    @property
    def torch_reads_pages(self) -> bool:
        """Some layer decodes with a token-level selection, which the torch decode kernel reads from
        the cache pages in place (through ``kv_cache.split_kv``'s strided views): the CPU cache must
        then keep the ``vec`` layout (``cpu_ops.cache_isa``). Dense and sink + window decode run on
        vLLM's op."""
        return not all(self.for_layer(i).decode_on_op for i in range(self.num_layers))

    @property
    def decode_capturable(self) -> bool:
        """Every layer decodes with a pattern whose decode step is one call on the engine's persistent
        buffers (``CAPTURABLE_DECODE``), so on CUDA a decode-only step can be captured as a graph."""
        return all(s.type in CAPTURABLE_DECODE for i in range(self.num_layers) for s in self.for_layer(i).decode_specs)

    def check_local(self, num_heads: int, num_kv_heads: int, head_size: int) -> None:
        """The attention layer vLLM built must have the per-rank shape the plan implies."""
        want = (self.local_heads, self.local_kv_heads, self.head_dim)
        have = (num_heads, num_kv_heads, head_size)
        if want != have:
            raise PlanError(PlanIssue(
                "$.model", f"(query heads, KV heads, head dim) per rank = {have} as vLLM built the layer "
                f"(tensor_parallel_size {self.tp_size})",
                f"{want} from the plan's model geometry"), file=self.plan_path)

    def for_layer(self, layer: int) -> LayerBinding:
        lb = self._layers.get(layer)
        if lb is None:
            if not 0 <= layer < self.num_layers:
                raise PlanError(PlanIssue("$.model.num_layers", f"more than {layer} (vLLM runs layer {layer})",
                                          str(self.num_layers)), file=self.plan_path)
            heads = self.heads
            group = self.local_heads // self.local_kv_heads
            prefill = [self.plan.prefill(layer, h) for h in heads]
            decode = [self.plan.decode(layer, h) for h in heads]
            sig = tuple(prefill) if all(is_static(s) for s in prefill) else None
            lb = LayerBinding(
                layer=layer, heads=heads,
                kv_heads=torch.arange(self.local_heads, dtype=torch.long) // group,
                num_layer_heads=self.num_heads, num_layer_kv_heads=self.num_kv_heads,
                prefill_specs=prefill,
                decode_specs=decode,
                num_local_kv_heads=self.local_kv_heads,
                prefill_group=None if sig is None else self._groups.setdefault(sig, len(self._groups)),
                decode_group=self._decode_groups.setdefault(tuple(decode), len(self._decode_groups)),
            )
            self._layers[layer] = lb
        return lb


# Decode patterns whose CUDA decode step a graph can capture: dense decode is FlashAttention over vLLM's
# persistent buffers (tests/test_plugin_cuda_routing.py). The selecting patterns build per-group head
# indices with host-to-device copies and are not yet declared (not verified on a GPU).
CAPTURABLE_DECODE = frozenset({"dense"})
COARSE_PREFILL = frozenset({"dense", "a_shape"})  # prefill types that tolerate vLLM's whole blocks as pages
OP_DECODE = frozenset({"dense", "window", "elastic_window"})  # decode patterns vLLM's CPU op runs (sink + window)
VLLM_CPU_BLOCK = 128  # vLLM's default KV block size on CPU
FINE_PAGE = 32  # the kernel page of plans that estimate or select tokens


def cpu_page(plan: Plan) -> int:
    """The page vLLM's CPU op reads for this plan with vLLM's default block size (the backend's
    ``get_supported_kernel_block_sizes``): whole blocks for ``coarse_pages`` plans, else 32."""
    return VLLM_CPU_BLOCK if PlanBinding(plan).coarse_pages else FINE_PAGE


# ------------------------------------------------------------------------- inside the engine
_WORKER: PlanBinding | None = None


def install_worker_binding(binding: PlanBinding | None) -> None:
    """Set (or clear) the process-wide binding; tests use it to run the backend without an engine."""
    global _WORKER
    _WORKER = binding


def worker_binding() -> PlanBinding:
    """The binding of this worker process, created on first use from vLLM's current config.

    Validates the plan against the model vLLM is building and the tensor-parallel layout; any
    mismatch raises ``PlanError`` here, inside model construction, so the engine does not start.
    """
    global _WORKER
    if _WORKER is not None:
        return _WORKER
    from vllm.config import get_current_vllm_config
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    cfg = get_current_vllm_config()
    path = resolve_plan_path(cfg.additional_config if isinstance(cfg.additional_config, dict) else None)
    plan = load_plan(path)
    mc = cfg.model_config
    text = mc.hf_text_config
    heads = text.num_attention_heads
    plan.check_geometry(
        num_layers=text.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=mc.get_head_size(), source=f"model {mc.model}")
    tp_size = get_tensor_model_parallel_world_size()
    _WORKER = PlanBinding(plan, get_tensor_model_parallel_rank(), tp_size, plan_path=path)
    return _WORKER
