"""Decode with sinks + a sliding window (StreamingLLM): read the first ``sink`` and last ``window`` tokens."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from headwise.kernels.index import DecodeMode, DecodeSelection

from .base import DecodeInputs, DensityContext, PatternModel


class Window(PatternModel):
    type: Literal["window"] = "window"
    sink: int = Field(64, ge=0, description="first tokens always read")
    window: int = Field(1024, ge=1, description="most recent tokens read, the current one included")


def select_decode(p: Window, inp: DecodeInputs) -> DecodeSelection:
    return DecodeSelection.uniform(inp.batch, len(inp.heads), DecodeMode.WINDOW, sink=p.sink, window=p.window,
                                   device=inp.seq_lens.device)


def expected_decode_density(p: Window, length: int, ctx: DensityContext = DensityContext()) -> float:
    return min(1.0, (p.sink + p.window) / max(1, length))
