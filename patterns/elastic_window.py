"""MoA elastic windows: a per-head sink + sliding window whose span grows with the length.

``span = alpha + beta * N`` rounded to a multiple of 64, where ``N`` is the request's total
length (prompt + planned generation), fixed when the prompt is prefilled. The same span is used
in decode, which is what lets MoA free the KV cache outside every head's window.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from headwise.kernels.index import DecodeMode, DecodeSelection, SparseIndex

from . import density
from .a_shape import sink_window_index
from .base import DecodeInputs, DensityContext, PatternModel, PrefillInputs

SPAN_ROUND = 64  # spans are multiples of 64 tokens, as in the MoA search space


class ElasticWindow(PatternModel):
    type: Literal["elastic_window"] = "elastic_window"
    sink: int = Field(64, ge=0, description="first tokens always attended")
    alpha: int = Field(1024, ge=0, description="span at length 0, tokens")
    beta: float = Field(0.0, ge=0.0, le=1.0, description="span growth per token of total length")


def span(p: ElasticWindow, total_len: int | torch.Tensor):
    """Window span at total length N: ``round64(alpha + beta * N)``, at least 64."""
    raw = p.alpha + p.beta * total_len
    if isinstance(raw, torch.Tensor):
        return torch.clamp(torch.round(raw / SPAN_ROUND) * SPAN_ROUND, min=SPAN_ROUND).long()
    return max(SPAN_ROUND, int(round(raw / SPAN_ROUND)) * SPAN_ROUND)


def build_prefill(p: ElasticWindow, inp: PrefillInputs) -> SparseIndex:
    h = len(inp.heads)
    device = inp.q.device if inp.q is not None else "cpu"
    w = span(p, inp.total_len)
    return sink_window_index(torch.full((h,), p.sink), torch.full((h,), w), inp.q_len, inp.q_offset,
                             inp.block_m, device)


def select_decode(p: ElasticWindow, inp: DecodeInputs) -> DecodeSelection:
    b, h = inp.batch, len(inp.heads)
    dev = inp.seq_lens.device
    w = span(p, inp.total_lens.to(dev).double()).to(torch.int32)  # [B]
    sel = DecodeSelection.uniform(b, h, DecodeMode.WINDOW, sink=p.sink, device=dev)
    sel.window = w.view(b, 1).expand(b, h).contiguous()
    return sel


def expected_density(p: ElasticWindow, length: int, ctx: DensityContext = DensityContext()) -> float:
    w = span(p, length + ctx.planned_generation)
    return density.sink_window_density(p.sink, w, length, ctx.block_m)  # = the built index's


def expected_decode_density(p: ElasticWindow, length: int, ctx: DensityContext = DensityContext()) -> float:
    w = span(p, length + ctx.planned_generation)
    return min(1.0, (p.sink + w) / max(1, length))
