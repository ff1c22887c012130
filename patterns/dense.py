"""Dense attention: the fallback, the first layers of most plans, and every short prompt."""

from __future__ import annotations

from typing import Literal

from headwise.kernels.index import DecodeMode, DecodeSelection, SparseIndex

from .base import DecodeInputs, DensityContext, PatternModel, PrefillInputs


class Dense(PatternModel):
    """Every causal key (prefill) or every cached token (decode)."""

    type: Literal["dense"] = "dense"


def build_prefill(p: Dense, inp: PrefillInputs) -> SparseIndex:
    device = inp.q.device if inp.q is not None else "cpu"
    return SparseIndex.dense(len(inp.heads), inp.q_len, inp.q_offset, inp.block_m, device=device)


def select_decode(p: Dense, inp: DecodeInputs) -> DecodeSelection:
    return DecodeSelection.uniform(inp.batch, len(inp.heads), DecodeMode.DENSE, device=inp.seq_lens.device)


def expected_density(p: Dense, length: int, ctx: DensityContext = DensityContext()) -> float:
    return 1.0


def expected_decode_density(p: Dense, length: int, ctx: DensityContext = DensityContext()) -> float:
    return 1.0
