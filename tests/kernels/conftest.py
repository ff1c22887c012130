"""Kernel tests: the Triton kernels run compiled on CUDA, or in Triton's interpreter elsewhere.

Triton picks interpreter or compiler when a function is *decorated*, i.e. when ``triton`` itself
(its standard library is made of jit functions) and our kernel modules are imported, reading
TRITON_INTERPRET at that moment. So without a GPU this conftest imports them right here, at
collection, with the variable set just for those imports: nothing else in the session (engine
subprocesses, other test folders) inherits it. If something imported ``triton`` before this
folder was collected, the interpreter cannot be switched on any more, and the Triton tests fail
with that explanation (run ``pytest tests/kernels`` on its own).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # kernels_testlib

HAS_CUDA = torch.cuda.is_available()
_KERNEL_MODULES = ["headwise.kernels.prefill_triton", "headwise.kernels.decode_triton",
                   "headwise.kernels.estimate_triton"]
_IMPORT_ERROR: str | None = None


def _import_interpreted() -> None:
    global _IMPORT_ERROR
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        _IMPORT_ERROR = ("triton was imported before tests/kernels/conftest.py could enable its interpreter; "
                         "run `pytest tests/kernels` in its own process")
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        try:  # imported lazily by Triton's launcher, and it checks the interpreter flag on import
            importlib.import_module("triton.experimental.gluon")
        except ImportError:
            pass
        for name in _KERNEL_MODULES:
            importlib.import_module(name)
    except ImportError as e:  # no triton at all
        _IMPORT_ERROR = f"triton is not importable: {e}"
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


if not HAS_CUDA:
    _import_interpreted()


@pytest.fixture(scope="session")
def triton_kernels():
    """``(prefill_triton, decode_triton, estimate_triton)``, compiled (CUDA) or interpreted (CPU)."""
    if _IMPORT_ERROR:
        pytest.fail(_IMPORT_ERROR)
    return tuple(importlib.import_module(n) for n in _KERNEL_MODULES)


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
