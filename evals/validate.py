"""The eval suite as ``headwise profile``'s validator: dense vs a new plan, on held-out eval seeds.

``headwise profile`` finds this module through the ``headwise.plan_validators`` entry point
(the server floor never imports the suite), reads ``TASK_NAMES`` to check ``--validate-tasks``,
and calls ``validate`` with the plan it made.
"""

from __future__ import annotations

import sys

from .tasks import TASKS

TASK_NAMES = tuple(sorted(TASKS))


def validate(plan, model_path: str, lengths: list[int], tasks: list[str], cases: int, dtype: str,
             accuracy_target: float) -> dict:
    """Each task × length × case through the transformers path, dense then ``plan``.

    Returns per-task scores for both, their means per length, how far the plan's mean trails
    dense's, and ``passed`` (it trails by at most ``accuracy_target`` at every length)."""
    from .runner import build_cases, run_cases
    from .targets import HFTarget

    scores: dict[str, dict] = {}
    for label, p in (("dense", "dense"), ("plan", plan)):
        target = HFTarget(model_path, p, dtype)
        rows = run_cases(target, build_cases(list(tasks), list(lengths), cases, target), 1, f"validate {label}")
        table: dict[str, dict[str, list[float]]] = {}
        for r in rows:
            table.setdefault(r["task"], {}).setdefault(str(r["length"]), []).append(r["score"])
        scores[label] = {t: {n: round(sum(v) / len(v), 3) for n, v in by.items()} for t, by in table.items()}
        del target
    mean = {label: {n: round(sum(by[n] for by in t.values()) / len(t), 3) for n in next(iter(t.values()))}
            for label, t in scores.items()}
    short = {n: round(mean["dense"][n] - mean["plan"][n], 3) for n in mean["dense"]}
    print(_table(scores, mean), file=sys.stderr)
    return {"tasks": list(tasks), "cases": cases, "seeds": "eval seeds 1000000+", "scores": scores, "mean": mean,
            "mean_below_dense": short, "target": accuracy_target,
            "passed": all(v <= accuracy_target + 1e-9 for v in short.values())}


def _table(scores: dict, mean: dict) -> str:
    """Markdown: one row per task, a dense and a plan column per length."""
    lengths = list(mean["dense"])
    lines = ["| task | " + " | ".join(f"{n} dense | {n} plan" for n in lengths) + " |",
             "|---|" + "---|---|" * len(lengths)]
    for t in scores["dense"]:
        lines.append(f"| {t} | " + " | ".join(f"{scores['dense'][t][n]:.2f} | {scores['plan'][t][n]:.2f}"
                                              for n in lengths) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{mean['dense'][n]:.2f}** | **{mean['plan'][n]:.2f}**"
                                              for n in lengths) + " |")
    return "\n".join(lines)
