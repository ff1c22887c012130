"""headwise.patterns: the Plan and every pattern family's index builder / decode selector.

``Plan``, ``PlanError`` and ``load_plan`` are re-exported lazily, so importing a single family
module does not pay for the whole plan machinery.
"""

from __future__ import annotations

_EXPORTS = {"Plan": "plan", "load_plan": "plan", "PlanError": "plan_errors", "PlanIssue": "plan_errors"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
