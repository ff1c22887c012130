"""Markdown table (task x length x label) and one PNG (mean score vs length, a line per label)."""

from __future__ import annotations

from pathlib import Path


def summary(report: dict) -> dict[str, dict[int, float]]:
    cells: dict[str, dict[int, list[float]]] = {}
    for c in report["cases"]:
        cells.setdefault(c["task"], {}).setdefault(c["length"], []).append(c["score"])
    return {t: {n: sum(v) / len(v) for n, v in row.items()} for t, row in cells.items()}


def markdown(reports: list[dict]) -> str:
    sums = [(r["label"], summary(r)) for r in reports]
    lengths = sorted({n for _, s in sums for row in s.values() for n in row})
    tasks = list(dict.fromkeys(t for _, s in sums for t in s))
    cols = [(n, label) for n in lengths for label, _ in sums]
    lines = ["| task | " + " | ".join(f"{n} {label}" for n, label in cols) + " |",
             "|---|" + "---|" * len(cols)]
    by = dict(sums)
    for t in tasks:
        vals = [by[label].get(t, {}).get(n) for n, label in cols]
        lines.append(f"| {t} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    means = []
    for n, label in cols:
        vals = [row[n] for row in by[label].values() if n in row]
        means.append(f"**{sum(vals) / len(vals):.2f}**" if vals else "-")
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in reports:
        s = summary(r)
        lengths = sorted({n for row in s.values() for n in row})
        means = [sum(row[n] for row in s.values() if n in row) / sum(1 for row in s.values() if n in row)
                 for n in lengths]
        ax.plot(lengths, means, marker="o", label=r["label"])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("mean score over tasks")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(reports: list[dict], out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(reports)
    (out / f"{name}.md").write_text(table)
    plot(reports, out / f"{name}.png")
    return table
