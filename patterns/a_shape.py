"""A-shape / streaming attention (StreamingLLM, MInference's A-shape): sinks + a local window.

Static: the index depends only on positions. Each query keeps the first ``sink`` keys and its
last ``window`` keys (itself included); the block layout lets the later queries of a 64-query
block see up to 63 more recent keys (see ``ranges.sink_window_intervals``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from headwise.kernels.index import SparseIndex

from . import density
from .base import DensityContext, PatternModel, PrefillInputs
from .ranges import block_bounds, make_index, merge_intervals, no_columns, sink_window_intervals


class AShape(PatternModel):
    type: Literal["a_shape"] = "a_shape"
    sink: int = Field(128, ge=0, description="first tokens every query attends to")
    window: int = Field(1024, ge=1, description="most recent tokens every query attends to (itself included)")


def sink_window_index(sink: torch.Tensor, window: torch.Tensor, q_len: int, q_offset: int, block_m: int,
                      device: torch.device | str = "cpu") -> SparseIndex:
    """Index of per-head ``sink`` + ``window`` (both ``[H]`` long); shared with MoA's elastic windows."""
    bs, be = block_bounds(q_offset, q_len, block_m, device)
    starts, ends = sink_window_intervals(bs, be, sink.to(device), window.to(device))
    rs, re, rc = merge_intervals(starts, ends, torch.ones_like(starts, dtype=torch.bool))
    cols, cc = no_columns(sink.shape[0], bs.shape[0], device)
    return make_index(rs, re, rc, cols, cc, q_len, q_offset, block_m)


def build_prefill(p: AShape, inp: PrefillInputs) -> SparseIndex:
    h = len(inp.heads)
    device = inp.q.device if inp.q is not None else "cpu"
    full = lambda v: torch.full((h,), v, dtype=torch.long)  # noqa: E731
    return sink_window_index(full(p.sink), full(p.window), inp.q_len, inp.q_offset, inp.block_m, device)


def expected_density(p: AShape, length: int, ctx: DensityContext = DensityContext()) -> float:
    return density.sink_window_density(p.sink, p.window, length, ctx.block_m)  # = the built index's
