"""Accuracy as users get it: the eval suite against stock vLLM and each plan, each through ``headwise serve``.

For stock (``headwise serve --no-headwise``) and every plan given, this starts the server the way
a user does, runs ``headwise eval --url …`` against it (the same command, client, seeds and cases
for every server), stops it, and finally merges the result files into one table and one PNG
(``headwise eval report``). Accuracy does not depend on timing, so this may share the machine.

    .venv/bin/python bench/eval_serve.py --lengths 4k,8k --cases 5
    .venv/bin/python bench/eval_serve.py --plans configs/smollm2-135m-instruct/sparse.json --lengths 4k --cases 1

Writes ``<out>/<name>-<label>.json/.md/.png`` per server and ``<out>/<name>.md/.png`` merged.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "configs" / "smollm2-135m-instruct"
DEFAULT_PLANS = [PLANS / "dense.json", PLANS / "sparse.json", PLANS / "profiled.json"]


def main() -> int:
    from headwise.server.commands.serve_process import ServerProcess

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", nargs="+", type=Path, default=DEFAULT_PLANS, help="plan files served by headwise")
    ap.add_argument("--no-stock", action="store_true", help="the plans' servers only")
    ap.add_argument("--lengths", default="4k,8k", help="passed to `headwise eval --lengths`")
    ap.add_argument("--tasks", default="all", help="passed to `headwise eval --tasks`")
    ap.add_argument("--cases", type=int, default=5, help="cases per task and length (the first N eval seeds)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight per server")
    ap.add_argument("--name", default="suite", help="prefix of the result files")
    ap.add_argument("--out", type=Path, default=ROOT / "evals" / "results")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `headwise serve` flag (repeatable)")
    args = ap.parse_args()
    for p in args.plans:
        if not p.is_file():
            ap.error(f"--plans: {p} is not a file")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / f"{args.name}-logs"
    logs.mkdir(exist_ok=True)
    order = ([] if args.no_stock else [("stock", ["--no-headwise"])]) + \
        [(p.stem, ["--plan", str(p.resolve())]) for p in args.plans]
    files, failed = [], []
    for label, serve_args in order:
        label = f"{args.name}-{label}"
        serve_args = serve_args + args.serve_arg
        print(f"# {label}: headwise serve {' '.join(serve_args)}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        with ServerProcess(serve_args, log_path=logs / f"serve-{label}.log") as server:
            rc = subprocess.call([sys.executable, "-m", "headwise.server.commands.cli", "eval", "--url", server.base_url,
                                  "--lengths", args.lengths, "--tasks", args.tasks, "--cases", str(args.cases),
                                  "--concurrency", str(args.concurrency), "--label", label, "--out", str(args.out)])
        print(f"# {label}: exit {rc} after {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        (failed if rc else files).append(label)
    paths = [str(args.out / f"{label}.json") for label in files]
    if paths:
        subprocess.check_call([sys.executable, "-m", "headwise.server.commands.cli", "eval", "report", *paths,
                               "--out", str(args.out), "--name", args.name])
    if failed:
        print(f"# failed: {', '.join(failed)} (their logs are under {logs})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
