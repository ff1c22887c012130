"""TidalDecode: position-persistent sparse decode across layers.

A ``select`` layer attends densely and also ranks every cached position by its pre-softmax score
``q . k`` (per query head), keeping the top ``top_k`` (the current token always among them). The
chosen positions go into a persistent buffer (``TidalState``); the ``reuse`` layers after it in
the same step attend only to those positions. The KV cache stays whole.

The buffer is allocated once (``[max_batch, heads, top_k]``) and written in place, so its address
never changes: CUDA graphs that capture decode keep pointing at the right memory.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from headwise.kernels import decode_select
from headwise.kernels.index import DecodeMode, DecodeSelection

from .base import DecodeInputs, DensityContext, PatternModel


class Tidal(PatternModel):
    type: Literal["tidal"] = "tidal"
    role: Literal["select", "reuse"] = Field("reuse", description="select: attend densely and pick; reuse: read the pick")
    top_k: int | None = Field(None, ge=1, description="tokens kept per head by a select layer; default settings.tidal_top_k")
    window: int = Field(0, ge=0, description="select layers: most recent tokens always kept (within top_k); "
                        "0 = the paper's pure top-k")


class TidalState:
    """Positions chosen by the last ``select`` layer of the current step, per (request row, local head).

    positions: ``[max_batch, num_heads, top_k]`` int32, sorted ascending below ``counts``.
    counts:    ``[max_batch, num_heads]`` int32.
    Heads are the *local* query heads of this rank (the same for every layer of the model).
    """

    def __init__(self, max_batch: int, num_heads: int, top_k: int, device: torch.device | str = "cpu"):
        self.top_k = top_k
        self.positions = torch.zeros(max_batch, num_heads, top_k, dtype=torch.int32, device=device)
        self.counts = torch.zeros(max_batch, num_heads, dtype=torch.int32, device=device)

    @property
    def max_batch(self) -> int:
        return self.positions.shape[0]

    def _check_batch(self, batch: int) -> None:
        if batch > self.max_batch:
            raise ValueError(f"TidalState: a batch of {batch} requests does not fit the buffer "
                             f"allocated for {self.max_batch}; allocate it for the engine's max batch size")

    def write(self, batch: int, local_heads: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor) -> None:
        """Store rows ``[0, batch)`` of ``local_heads``: positions ``[B, h, <=top_k]``, counts ``[B, h]``."""
        self._check_batch(batch)
        k = positions.shape[-1]
        if k > self.top_k:
            raise ValueError(f"TidalState: {k} positions per head do not fit top_k = {self.top_k}")
        heads = local_heads.to(self.positions.device).long()
        self.positions[:batch, heads, :k] = positions.to(self.positions)
        self.counts[:batch, heads] = counts.to(self.counts)

    def read(self, batch: int, local_heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_batch(batch)
        heads = local_heads.to(self.positions.device).long()
        return self.positions[:batch, heads], self.counts[:batch, heads]


def choose(q: torch.Tensor, inp: DecodeInputs, top_k: int, window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``top_k`` cached positions per (request, head) by ``q . k``; the current token (and the
    last ``window`` tokens) forced in.

    Returns sorted positions ``[B, H, min(top_k, max_len)]`` (padded past ``counts``) and counts ``[B, H]``.
    ``torch.topk`` over tiles of the cache (``kernels.decode_select``), never a full sort.
    """
    return decode_select.decode_topk(q, inp.k_cache, inp.block_table, inp.seq_lens, inp.kv_heads, top_k,
                                     window=max(1, window), scale=inp.scale, max_len=inp.max_seq_len)


def select_decode(p: Tidal, inp: DecodeInputs, state: TidalState | None, local_heads: torch.Tensor,
                  default_top_k: int) -> DecodeSelection:
    """``select``: write the pick and attend densely. ``reuse``: attend to the stored pick."""
    b, h = inp.batch, len(inp.heads)
    dev = inp.seq_lens.device
    if state is None:
        raise ValueError("a tidal decode pattern needs a TidalState (the buffer shared by the layers of a step)")
    if p.role == "select":
        if inp.q is None or inp.k_cache is None:
            raise ValueError("tidal select needs q and the paged k_cache")
        positions, counts = choose(inp.q, inp, min(p.top_k or default_top_k, state.top_k), p.window)
        state.write(b, local_heads, positions, counts)
        return DecodeSelection.uniform(b, h, DecodeMode.DENSE, device=dev)
    positions, counts = state.read(b, local_heads)
    return DecodeSelection.uniform(b, h, DecodeMode.POSITIONS, indices=positions.to(dev), count=counts.to(dev),
                                   device=dev)


def expected_decode_density(p: Tidal, length: int, ctx: DensityContext = DensityContext()) -> float:
    if p.role == "select":
        return 1.0
    return min(1.0, (p.top_k or ctx.tidal_top_k) / max(1, length))
