"""The headwise attention backends vLLM registers: capabilities, and the builder and impl classes.

``HeadwiseCPUBackend`` takes the ``CPU_ATTN`` name (vLLM's CPU platform always picks that one),
``HeadwiseCUDABackend`` the ``CUSTOM`` slot (``--attention-backend CUSTOM``). Both hand vLLM the
step planner (``metadata.HeadwiseMetadataBuilder``) and the per-layer impl (``impl.HeadwiseImpl``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, MultipleOf

try:  # 0.32 re-exports the layout enum here; keep working if it moves
    from vllm.v1.kv_cache_interface import KVCacheLayout
except ImportError:  # pragma: no cover - other vLLM versions
    from vllm.v1.kv_cache_layout import KVCacheLayout

from .impl import HeadwiseImpl
from .metadata import HeadwiseMetadataBuilder


# -------------------------------------------------------------------------------- backends
class _HeadwiseBackend(AttentionBackend):
    """Capabilities shared by the CPU and CUDA registrations."""

    forward_includes_kv_cache_update: bool = False  # vLLM calls impl.do_kv_cache_update first
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", "float32"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # (kv_cache_spec=None) serves both the 0.31 (no argument) and 0.32+ signatures.
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls):
        # head-major pages: one KV head's tokens of a block are contiguous for the gathers
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # a connector would write some other backend's layout into our cache

    @staticmethod
    def get_impl_cls():
        return HeadwiseImpl

    @staticmethod
    def get_builder_cls():
        return HeadwiseMetadataBuilder


class HeadwiseCPUBackend(_HeadwiseBackend):
    """Registered over ``CPU_ATTN``: vLLM's CPU platform always picks that name."""

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # The grain at which vLLM's CPU op reads sparse rows straight from the cache (``cpu_ops``).
        # 32: vLLM splits its (default 128-token) blocks into 32-token kernel pages, for plans that
        # estimate their patterns. A sink/window plan with dense decode (``coarse_pages``) keeps
        # vLLM's blocks, as stock does: on a 2-core Xeon (AMX, bf16, 9/3 heads, head dim 64) the op
        # on 32-token pages took 12% longer than on 128-token blocks for a decode query over 32K
        # keys (0.74 vs 0.65 ms) and 24% longer for 2,048 dense queries (234 vs 189 ms), while the
        # default plan's A-shape chunk took the same 2.9 ms on either.
        try:
            from .plan_binding import worker_binding

            coarse = worker_binding().coarse_pages
        except Exception:  # no plan reachable in this process (vLLM asks in several): fine pages
            coarse = False
        return [MultipleOf(32)] if coarse else [32]

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"


class HeadwiseCUDABackend(_HeadwiseBackend):
    """Registered as ``CUSTOM``; selected with ``--attention-backend CUSTOM``."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"
