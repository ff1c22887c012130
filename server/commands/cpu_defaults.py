"""What ``headwise serve`` sets on a CPU machine so the server is as fast as the machine allows.

Each default applies only when the user chose nothing for it (a flag given, or the variable already
in the environment, wins), is logged among the start-up defaults and shown by ``--dry-run``, and
applies to ``--no-headwise`` too: a comparison with stock attention through ``headwise serve``
differs in the attention backend only.

* ``--dtype float32`` when the CPU has no native bf16 arithmetic (neither AVX512-BF16 nor AMX):
  there bf16 matrix products are emulated. Measured on a 2-core AMD EPYC (AVX2 only), stock
  vLLM, SmolLM2-135M: a 439-token prompt's time to first token 12.6 s in bf16 vs 2.0 s in fp32
  (``bench/serve_cpu.py --quick``, with and without ``--serve-arg=--dtype --serve-arg=float32``).
* OpenMP and thread binding (``THREAD_ENV``): see the figures there.
"""

from __future__ import annotations

import argparse
import functools
import os

# Environment for vLLM's CPU worker, from measurements through the server (see the module doc).
THREAD_ENV: dict[str, str] = {}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); unknown CPUs count as yes."""
    flags = cpu_flags()
    return not flags or bool(flags & {"avx512_bf16", "amx_bf16"})


def serve_defaults(user: argparse.Namespace) -> tuple[list[str], dict[str, str], list[str]]:
    """(vLLM flags, environment, log lines) for a CPU server, given the user's parsed vLLM args."""
    argv: list[str] = []
    notes: list[str] = []
    if getattr(user, "dtype", "auto") in (None, "auto") and not native_bf16():
        argv += ["--dtype", "float32"]
        notes.append("--dtype float32 on this CPU (no native bf16: AVX512-BF16/AMX absent; pass --dtype to choose)")
    env = {k: v for k, v in THREAD_ENV.items() if k not in os.environ}
    if env:
        notes.append("CPU threads: " + " ".join(f"{k}={v}" for k, v in env.items()) + " (set them to override)")
    return argv, env, notes
