"""Every ``HEADWISE_*`` environment variable, read here and nowhere else.

Environment variables are how settings reach vLLM's spawned engine and worker processes (Python
state does not travel), so both rooms of ``server/`` read them: the plugin inside the engine, the
commands in the API process. Each name is defined once, with what it means and its default.
"""

from __future__ import annotations

import os
from pathlib import Path

ENABLE = "HEADWISE_ENABLE"  # "1": the vLLM plugin registers its backend (nothing happens otherwise)
PLAN = "HEADWISE_PLAN"  # the plan JSON the engine serves (after --additional-config)
STATS_DIR = "HEADWISE_STATS_DIR"  # where workers publish their stats snapshots
CPU_NATIVE = "HEADWISE_CPU_NATIVE"  # "0": never use vLLM's fused CPU attention op
PROFILE = "HEADWISE_PROFILE"  # "1": workers time each part of every layer's attention (stats "part_seconds")
HOME = "HEADWISE_HOME"  # where the embedded model is converted (default ~/.cache/headwise)
CONFIGS = "HEADWISE_CONFIGS"  # the directory holding shipped plans (default: the repository's configs/)
API_KEY = "HEADWISE_API_KEY"  # bearer token the load tests send
PARENT_PID = "HEADWISE_PARENT_PID"  # pid whose death ends an engine process (see commands/supervise.py)

ALL = (ENABLE, PLAN, STATS_DIR, CPU_NATIVE, PROFILE, HOME, CONFIGS, API_KEY, PARENT_PID)


def get(name: str, default: str | None = None) -> str | None:
    """The variable's value, ``default`` when unset or empty."""
    return os.environ.get(name) or default


def enabled() -> bool:
    return os.environ.get(ENABLE, "") == "1"


def plan_path() -> str | None:
    return get(PLAN)


def stats_dir() -> str | None:
    return get(STATS_DIR)


def cpu_native() -> bool:
    return os.environ.get(CPU_NATIVE, "1") != "0"


def profile() -> bool:
    return os.environ.get(PROFILE, "") == "1"


def home() -> Path:
    """``$HEADWISE_HOME``, else ``$XDG_CACHE_HOME/headwise``, else ``~/.cache/headwise``."""
    if get(HOME):
        return Path(get(HOME)).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "headwise"


def configs_dir() -> Path:
    """``$HEADWISE_CONFIGS``, else the repository's ``configs/`` next to the package sources."""
    if get(CONFIGS):
        return Path(get(CONFIGS)).expanduser()
    return Path(__file__).resolve().parents[1] / "configs"
