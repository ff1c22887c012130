"""``headwise eval``: run the suite against an OpenAI-compatible endpoint or the transformers path.

    headwise eval --url http://127.0.0.1:8000/v1 --lengths 4096,8192 --tasks all --cases 3 --label sparse
    headwise eval --hf MODEL_DIR --plan PLAN.json --lengths 1024 --tasks niah_single,qa
    headwise eval report evals/results/*.json --out evals/results --name merged

Every request is greedy (temperature 0). Writes ``LABEL.json`` (every case: task, length, seed,
prompt tokens, expected, reply, score), ``LABEL.md`` and ``LABEL.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import report as rep
from .runner import build_cases, run_cases


def _lengths(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="long-context accuracy suite (RULER-style) against a server or a plan",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="OpenAI-compatible base URL (…/v1)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model", default=None, help="model name on the server (default: its first)")
    p.add_argument("--model-dir", default=None, help="count tokens with this tokenizer (default: the server's /tokenize)")
    p.add_argument("--hf", default=None, metavar="MODEL_DIR", help="the transformers path with --plan instead of a URL")
    p.add_argument("--plan", default="dense", help="with --hf: a plan file, or 'dense' (default)")
    p.add_argument("--lengths", type=_lengths, default=[4096], help="prompt lengths in tokens, e.g. 1k,4k,8192")
    p.add_argument("--tasks", default="all", help="comma list or 'all'")
    p.add_argument("--cases", type=int, default=3, help="cases per task and length: the first N eval seeds")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--label", default=None)
    p.add_argument("--out", type=Path, default=Path("evals/results"))
    sub = p.add_subparsers(dest="eval_command")
    r = sub.add_parser("report", help="merge result files into one Markdown table and one PNG")
    r.add_argument("files", nargs="+", type=Path)
    r.add_argument("--out", dest="report_out", type=Path, default=Path("evals/results"))
    r.add_argument("--name", default="merged")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    if getattr(args, "eval_command", None) == "report":
        reports = [json.loads(f.read_text()) for f in args.files]
        print(rep.write(reports, args.report_out, args.name))
        return 0
    from .tasks import TASKS

    tasks = list(TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or any(t not in TASKS for t in tasks) or (args.url is None) == (args.hf is None):
        print(f"headwise eval: give one of --url/--hf and tasks from {', '.join(TASKS)}", file=sys.stderr)
        return 2
    from .targets import HFTarget, OpenAITarget

    target = OpenAITarget(args.url, args.api_key, args.served_model, args.model_dir) if args.url \
        else HFTarget(args.hf, args.plan)
    label = args.label or target.label
    cases = build_cases(tasks, args.lengths, args.cases, target)
    head = {"label": label, "target": target.describe(), "tasks": tasks, "lengths": args.lengths,
            "command": " ".join(["headwise", *sys.argv[1:]]), "planned_cases": len(cases)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{label}.json"

    def save(rows: list[dict], complete: bool) -> dict:  # atomically, after every answer: a cut run keeps them
        report = {**head, "complete": complete, "cases": rows}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(path)
        return report

    results = run_cases(target, cases, args.concurrency, label, on_row=lambda rows: save(rows, False))
    report = save(results, True)
    print(rep.write([report], args.out, label))
    return 1 if any(r.get("error") for r in results) else 0
