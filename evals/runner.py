"""Sizing every (task, length, seed) case for a target, then asking it with bounded concurrency."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import eval_seeds
from .score import score
from .sizing import fit, messages_of
from .tasks import TASKS


def build_cases(tasks: list[str], lengths: list[int], cases: int, target) -> list[dict]:
    """Lengths above the model's maximum less the answer budget are clamped to it (recorded)."""
    out = []
    for name in tasks:
        t = TASKS[name]
        for length in lengths:
            goal = min(length, target.max_len - t.max_tokens) if target.max_len else length
            for seed in eval_seeds(cases):
                draft, tokens = fit(t, seed, goal, target.count)
                out.append({"task": name, "length": length, "target_tokens": goal, "seed": seed,
                            "prompt_tokens": tokens, "max_tokens": t.max_tokens, "draft": draft})
    return out


def run_cases(target, cases: list[dict], concurrency: int, label: str, on_row=None) -> list[dict]:
    """Every case asked once; ``on_row(rows_so_far)`` after each answer (in the order they finished)."""
    from tqdm import tqdm

    bar = tqdm(total=len(cases), desc=f"eval {label}", file=sys.stderr)
    done: list[dict] = []
    lock = threading.Lock()

    def one(c: dict) -> dict:
        d = c.pop("draft")
        t0 = time.monotonic()
        row = {**c, "expected": list(d.expected), "distractors": list(d.distractors), "kind": d.kind,
               "depths": [round(x, 4) for x in d.depths]}  # where the asked-for answers sit, 0 = start
        try:
            reply, used = target.generate(messages_of(d), c["max_tokens"])
            row.update(reply=reply, usage_prompt_tokens=used, score=score(reply, d.expected, d.distractors, d.kind))
        except Exception as exc:  # noqa: BLE001 - recorded, scored 0, and the command exits 1
            row.update(reply=None, error=f"{type(exc).__name__}: {exc}", score=0.0)
        row["seconds"] = round(time.monotonic() - t0, 3)
        with lock:
            done.append(row)
            if on_row is not None:
                on_row(list(done))
        bar.update(1)
        return row

    with ThreadPoolExecutor(max_workers=max(1, concurrency if target.concurrent else 1)) as pool:
        rows = list(pool.map(one, cases))
    bar.close()
    return rows
