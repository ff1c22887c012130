"""Timers for the parts of a layer's attention call, summed into the worker's stats recorder when the
process profiles (``HEADWISE_PROFILE=1``; ``stats.PROFILE_PARTS``). Off, ``phase`` returns one shared
no-op context, so the hot path pays a function call. On CUDA a timed part synchronises the device
first and last, so its seconds are the device's, not the launch's."""

from __future__ import annotations

import time
from contextlib import nullcontext

from . import stats


class _Part:
    """Times one part of a layer's attention call into the recorder (see ``phase``)."""

    __slots__ = ("rec", "layer", "part", "started", "sync")

    def __init__(self, rec: stats.StatsRecorder, layer: int, part: str):
        self.rec, self.layer, self.part = rec, layer, part
        self.sync = rec.device == "cuda"

    def __enter__(self) -> None:
        if self.sync:
            _cuda_sync()
        self.started = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.sync:
            _cuda_sync()
        self.rec.add_part(self.layer, self.part, time.perf_counter() - self.started)


def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


_OFF = nullcontext()


def phase(layer: int, part: str):
    """``with phase(layer, "kernel"): ...`` adds the block's seconds to the layer's part when the
    process profiles (``HEADWISE_PROFILE=1``); otherwise a shared no-op context."""
    rec = stats.get_recorder()
    if rec is None or not rec.profiling:
        return _OFF
    return _Part(rec, layer, part)


def step_phase(part: str):
    """The same for a per-step part (``plan``: the metadata builder)."""
    rec = stats.get_recorder()
    if rec is None or not rec.profiling:
        return _OFF
    return _StepPart(rec, part)


class _StepPart(_Part):
    __slots__ = ()

    def __init__(self, rec: stats.StatsRecorder, part: str):
        super().__init__(rec, -1, part)

    def __exit__(self, *exc) -> None:
        if self.sync:
            _cuda_sync()
        self.rec.add_step_part(self.part, time.perf_counter() - self.started)
