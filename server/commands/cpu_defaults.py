"""What ``headwise serve`` sets on a CPU machine so the server is as fast as the machine allows.

Each default applies only when the user chose nothing for it (a flag given, or the variable already
in the environment, wins), is logged among the start-up defaults and shown by ``--dry-run``, and
applies to ``--no-headwise`` too: a comparison with stock attention through ``headwise serve``
differs in the attention backend only.

* ``--dtype float32`` when the CPU has no native bf16 arithmetic (neither AVX512-BF16 nor AMX):
  there bf16 matrix products are emulated. Measured on a 2-core AMD EPYC (AVX2 only), stock
  vLLM, SmolLM2-135M: a 439-token prompt's time to first token 12.6 s in bf16 vs 2.0 s in fp32
  (``bench/serve_cpu.py --quick``, with and without ``--serve-arg=--dtype --serve-arg=float32``).
* On small machines (at most ``SMALL_MACHINE_CPUS`` usable CPUs, one tensor-parallel rank) the
  worker's OpenMP threads are bound to every CPU (``VLLM_CPU_OMP_THREADS_BIND``) instead of vLLM's
  default of keeping one CPU back for the API server (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``), and
  idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``): spinning threads
  on every core starve the API server and the engine core, which stream the tokens. Measured
  through ``headwise serve --no-headwise --dtype float32`` on the 2-core EPYC, a 2K-token prompt
  with 48 output tokens, two requests each (TTFT; inter-token latency):
  vLLM's default binding 15.7/15.6 s, 172/153 ms; both cores, spinning 9.0/8.5 s, 111/218 ms (and
  ~350 ms under a 4-request load); both cores, passive 11.9/11.3 s, 135/139 ms.
"""

from __future__ import annotations

import argparse
import functools
import os

SMALL_MACHINE_CPUS = 4


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (vLLM's CPU list syntax)."""
    parts, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            parts.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(parts)


def thread_env(tensor_parallel_size: int = 1) -> dict[str, str]:
    """The worker's thread binding on a small machine (see the module doc), else nothing."""
    cpus = _cpus()
    if tensor_parallel_size != 1 or len(cpus) > SMALL_MACHINE_CPUS:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": _ranges(cpus), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "OMP_WAIT_POLICY": "PASSIVE"}


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
    wanted = thread_env(int(getattr(user, "tensor_parallel_size", 1) or 1))
    env = {k: v for k, v in wanted.items() if k not in os.environ} if not (wanted.keys() & os.environ.keys()) else {}
    if env:
        notes.append("CPU threads: " + " ".join(f"{k}={v}" for k, v in env.items()) + " (set them to override)")
    return argv, env, notes
