"""The ``vllm.general_plugins`` entry point and the switch that turns headwise on.

vLLM calls ``register()`` in every process it starts (API server, engine core, each worker) before
the model is built. Installing headwise must never change someone else's vLLM, so nothing happens
unless ``HEADWISE_ENABLE=1`` is in the environment (environment variables reach the spawned
engine and worker processes; Python state does not), except that ``HEADWISE_PROFILE=1`` alone puts
timers around vLLM's own CPU attention (``stock_timing.py``). When enabled:

* CUDA: the backend takes the ``CUSTOM`` slot; the user selects it with
  ``--attention-backend CUSTOM`` (``engine_args`` / ``cli_args`` add it).
* CPU: vLLM's CPU platform ignores any backend choice and always uses ``CPU_ATTN``, so headwise
  overrides ``CPU_ATTN`` itself.

The plan path reaches the engine through ``--additional-config '{"headwise": {"plan": ...}}'``
(or ``$HEADWISE_PLAN``); ``engine_args`` sets both. This module imports nothing heavy at the top:
vLLM is imported only inside ``register()``, which vLLM itself calls.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from headwise.server import env

ENV_ENABLE, ENV_PLAN, ENV_STATS_DIR = env.ENABLE, env.PLAN, env.STATS_DIR
PLUGIN_NAME = "headwise"  # the entry-point name in pyproject.toml (what VLLM_PLUGINS must list)
CPU_BACKEND = "headwise.server.plugin.backend.HeadwiseCPUBackend"
CUDA_BACKEND = "headwise.server.plugin.backend.HeadwiseCUDABackend"

_registered: str | None = None


def enabled() -> bool:
    return env.enabled()


def register() -> None:
    """Entry point: register the headwise backend when ``HEADWISE_ENABLE=1``; idempotent."""
    global _registered
    if not enabled():
        if env.profile():  # profiling stock vLLM: time its own attention (changes nothing it computes)
            from . import stock_timing

            stock_timing.install()
        return
    if _registered is not None:
        return
    from vllm.logger import init_logger
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
        _registered = "CPU_ATTN"
    else:
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND)
        _registered = "CUSTOM"
    init_logger("vllm.headwise").info("headwise: attention backend registered as %s (pid %d)", _registered, os.getpid())


def registered_as() -> str | None:
    """The backend slot this process registered (``CPU_ATTN``, ``CUSTOM``) or None."""
    return _registered


# --------------------------------------------------------------------------- switching it on
def _check_allowlist() -> None:
    allow = os.environ.get("VLLM_PLUGINS")
    if allow is not None and PLUGIN_NAME not in [p.strip() for p in allow.split(",")]:
        raise RuntimeError(
            f"VLLM_PLUGINS={allow!r} does not list the '{PLUGIN_NAME}' plugin: vLLM would skip it and "
            f"run its stock attention silently; add '{PLUGIN_NAME}' to VLLM_PLUGINS or unset it"
        )


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def enable_env(plan: str | os.PathLike, stats_dir: str | os.PathLike) -> dict[str, str]:
    """The environment a process needs for its vLLM engine to run headwise with ``plan``."""
    return {ENV_ENABLE: "1", ENV_PLAN: str(Path(plan).resolve()), ENV_STATS_DIR: str(stats_dir)}


def _settings(plan: str | os.PathLike, stats_dir: str | os.PathLike | None) -> dict[str, str]:
    plan_path = Path(plan).expanduser().resolve()
    if not plan_path.is_file():
        raise FileNotFoundError(f"headwise plan {plan_path} does not exist; expected a plan JSON file")
    if stats_dir is None:
        stats_dir = tempfile.mkdtemp(prefix="headwise-stats-")
    return {"plan": str(plan_path), "stats_dir": str(Path(stats_dir).resolve())}


def engine_args(plan: str | os.PathLike, *, stats_dir: str | os.PathLike | None = None,
                validate_for: str | None = None, **extra) -> dict:
    """Engine keyword arguments for ``vllm.LLM(model, **engine_args(plan))``, switching headwise on.

    Sets ``HEADWISE_ENABLE``, ``HEADWISE_PLAN`` and ``HEADWISE_STATS_DIR`` in ``os.environ`` (the
    engine processes vLLM spawns inherit them) and returns ``additional_config`` carrying the plan
    and the stats directory (a fresh temporary one when ``stats_dir`` is None), plus
    ``attention_backend="CUSTOM"`` on CUDA. ``extra`` is merged in (an ``additional_config`` in it
    is merged key by key). ``validate_for`` (a model path): check the plan against that model (and
    ``tensor_parallel_size`` in ``extra``) first, raising ``PlanError`` before anything starts.
    """
    _check_allowlist()
    if validate_for is not None:
        from .plan_binding import validate_plan_for_model

        validate_plan_for_model(plan, validate_for, int(extra.get("tensor_parallel_size", 1)))
    settings = _settings(plan, stats_dir)
    os.environ.update(enable_env(settings["plan"], settings["stats_dir"]))
    kw: dict = {}
    if _on_cuda():
        kw["attention_backend"] = "CUSTOM"
    extra = dict(extra)
    additional = dict(extra.pop("additional_config", None) or {})
    additional["headwise"] = {**additional.get("headwise", {}), **settings}
    kw["additional_config"] = additional
    kw.update(extra)
    return kw


def cli_args(plan: str | os.PathLike, stats_dir: str | os.PathLike | None = None) -> list[str]:
    """The same for a ``vllm serve``-style argv (the caller also needs ``enable_env`` in the
    child's environment; ``engine_args`` is the in-process equivalent)."""
    settings = _settings(plan, stats_dir)
    argv = ["--additional-config", json.dumps({"headwise": settings})]
    if _on_cuda():
        argv += ["--attention-backend", "CUSTOM"]
    return argv


def disable() -> None:
    """Remove the switch from ``os.environ`` (for a stock engine later in the same process)."""
    for name in (ENV_ENABLE, ENV_PLAN, ENV_STATS_DIR):
        os.environ.pop(name, None)
