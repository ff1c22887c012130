"""A torch function mode that fails a test where a tensor's value reaches the host.

On CUDA each of these calls waits for the device (a sync), so code meant to run inside a captured
step must make none; running its CUDA branch on CPU under ``NoHostSync`` checks that without a GPU.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class NoHostSync(TorchFunctionMode):
    """Raises on every way a tensor's value reaches the host (each is a device sync on CUDA)."""

    BANNED = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy,
              torch.unique, torch.Tensor.unique, torch.equal}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED:
            raise AssertionError(f"host sync: {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))
