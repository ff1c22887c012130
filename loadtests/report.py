"""Summary JSON and plots of one headless load test (the files ``run.py`` collected).

Inputs in the output directory: ``samples.jsonl`` (one line per request, written by the locust
users: times, token counts, errors), ``locust_stats_history.csv`` and ``locust_exceptions.csv``
(locust's own tables). Counts and latencies come from the samples: every request writes one,
failed or not (locust's client turns a refused connection into a status-0 response). Locust's
``locust_stats.csv`` is written when the run time ends, so it misses the requests that finish
during the stop timeout; an exception that escaped a user's task is counted as a failure too.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

SAMPLES = "samples.jsonl"
STATS_CSV = "locust_stats.csv"
EXCEPTIONS_CSV = "locust_exceptions.csv"
HISTORY_CSV = "locust_stats_history.csv"
LATENCY_PNG = "latency_over_time.png"
TTFT_PNG = "ttft_vs_prompt_length.png"
SUMMARY = "summary.json"
METRICS = ("ttft_ms", "itl_ms", "e2e_ms")


def load_samples(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_csv(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def distribution(values: list[float]) -> dict:
    """count, mean, p50, p90, p99, max of ``values`` (None entries dropped); empty -> count 0 only."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"count": 0}
    return {"count": len(vals), "mean": sum(vals) / len(vals), "p50": _quantile(vals, 0.5),
            "p90": _quantile(vals, 0.9), "p99": _quantile(vals, 0.99), "max": vals[-1]}


def _int(row: dict, key: str) -> int:
    try:
        return int(float(row.get(key) or 0))
    except ValueError:
        return 0


def summarize(out_dir: str | Path, config: dict, locust_exit_code: int | None = None) -> dict:
    """The summary dict (also written to ``summary.json``)."""
    out = Path(out_dir)
    samples = load_samples(out / SAMPLES)
    task_exceptions = sum(_int(r, "Count") for r in read_csv(out / EXCEPTIONS_CSV))
    ok = [s for s in samples if s["ok"]]
    span = (max(s["time"] for s in samples) - min(s["time"] - s["e2e_ms"] / 1000 for s in samples)) if samples else 0.0
    out_tokens = sum(s["completion_tokens"] or 0 for s in ok)
    graded = [s["correct"] for s in ok if s.get("correct") is not None]
    by_length = {}
    for target in sorted({s["target_tokens"] for s in samples}):
        group = [s for s in ok if s["target_tokens"] == target]
        by_length[str(target)] = {
            "requests": sum(1 for s in samples if s["target_tokens"] == target),
            "failures": sum(1 for s in samples if s["target_tokens"] == target and not s["ok"]),
            "prompt_tokens": distribution([s["prompt_tokens"] for s in group]),
            **{m: distribution([s[m] for s in group]) for m in METRICS},
        }
    summary = {
        "config": config,
        "model": samples[0]["model"] if samples else None,
        "requests": len(samples) + task_exceptions,
        "failures": len(samples) - len(ok) + task_exceptions,
        "task_exceptions": task_exceptions,
        "wall_s": span,
        "requests_per_s": len(ok) / span if span else 0.0,
        "output_tokens_per_s": out_tokens / span if span else 0.0,
        **{m: distribution([s[m] for s in ok]) for m in METRICS},
        "prompt_tokens": distribution([s["prompt_tokens"] for s in ok]),
        "completion_tokens": distribution([s["completion_tokens"] for s in ok]),
        "passkey_accuracy": sum(graded) / len(graded) if graded else None,
        "by_prompt_length": by_length,
        "errors": sorted({s["error"] for s in samples if s["error"]})[:20],
        "locust_exit_code": locust_exit_code,
        "files": {"samples": SAMPLES, "locust_stats": STATS_CSV, "locust_history": HISTORY_CSV,
                  "latency_plot": LATENCY_PNG, "ttft_plot": TTFT_PNG},
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_latency_over_time(out_dir: str | Path, title: str = "") -> Path:
    """p50 / p90 / p99 of TTFT, ITL and end-to-end latency per time window, and the user count."""
    out = Path(out_dir)
    samples = [s for s in load_samples(out / SAMPLES) if s["ok"]]
    history = [r for r in read_csv(out / HISTORY_CSV) if r.get("Name") == "Aggregated"]
    plt = _pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    t0 = min([s["time"] - s["e2e_ms"] / 1000 for s in samples] + [_int(r, "Timestamp") for r in history] or [0])
    if samples:
        end = max(s["time"] for s in samples) - t0
        width = max(2.0, end / 15)  # ~15 windows whatever the run length
        edges = [i * width for i in range(int(end // width) + 2)]
        for ax, metric, label in zip(axes, METRICS, ("time to first token", "inter-token latency",
                                                        "end-to-end latency")):
            mids, lines = [], {q: [] for q in ("p50", "p90", "p99")}
            for lo, hi in zip(edges, edges[1:]):
                window = [s[metric] for s in samples if lo <= s["time"] - t0 < hi and s[metric] is not None]
                if window:
                    d = distribution(window)
                    mids.append((lo + hi) / 2)
                    for q in lines:
                        lines[q].append(d[q])
            for q, ys in lines.items():
                ax.plot(mids, ys, marker="o", markersize=3, label=q)
            ax.set_ylabel(f"{label} (ms)")
            ax.legend(loc="upper left", fontsize=8)
            ax.grid(alpha=0.3)
    if history:
        axes[3].step([_int(r, "Timestamp") - t0 for r in history], [_int(r, "User Count") for r in history],
                     where="post")
    axes[3].set_ylabel("users")
    axes[3].set_xlabel("seconds since start (requests placed by completion time)")
    axes[3].grid(alpha=0.3)
    fig.suptitle(title or "latency percentiles over time")
    fig.tight_layout()
    path = out / LATENCY_PNG
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ttft_vs_length(out_dir: str | Path, title: str = "") -> Path:
    """Every request's TTFT against its prompt tokens, with the median per configured length."""
    out = Path(out_dir)
    samples = [s for s in load_samples(out / SAMPLES) if s["ok"] and s["prompt_tokens"]]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([s["prompt_tokens"] for s in samples], [s["ttft_ms"] for s in samples], s=12, alpha=0.5,
               label="requests")
    medians = []
    for target in sorted({s["target_tokens"] for s in samples}):
        group = [s for s in samples if s["target_tokens"] == target]
        medians.append((distribution([s["prompt_tokens"] for s in group])["p50"],
                        distribution([s["ttft_ms"] for s in group])["p50"]))
    if medians:
        ax.plot(*zip(*medians), color="black", marker="s", label="median per configured length")
    ax.set_xlabel("prompt tokens (chat template included)")
    ax.set_ylabel("time to first token (ms)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "TTFT vs prompt length")
    fig.tight_layout()
    path = out / TTFT_PNG
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
