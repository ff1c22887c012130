"""Stock and headwise side by side, requests alternated: latency differences smaller than the drift.

``serve_cpu.py`` serves stock, then each plan, then stock again; on a shared 2-core VM the
machine's speed drifts by several percent over the hour that takes, which hides a difference of a
few percent in inter-token latency. Here both servers are up at once (each started as a user
starts it: ``headwise serve --no-headwise`` and ``headwise serve --plan P``) and the requests
alternate, one at a time: stock, headwise, headwise, stock, ... (an ABBA order, so a drift that
is linear over a round cancels). Only one server computes at any moment (the idle one's threads
sleep: ``OMP_WAIT_POLICY=PASSIVE`` is among the CPU defaults). Per length, every request's time to
first token, inter-token latency and end-to-end time; the summary gives each measure's median
over the rounds, the median of the per-round ratios (stock / headwise: > 1 means headwise is
faster) and the fraction of rounds in which headwise was at least as fast.

``--cached-prefix`` measures decode at long context without a long prefill per round: every
request of a length shares its body as a prefix (the nonce comes after it), each server prefills
it once in a warm-up request that is not counted, and the measured requests prefill only their
last tokens from the prefix cache, then decode over the whole context. Their TTFT is that of a
cache hit, not of the prompt. ``--long`` serves both with the YaRN-stretched 40K context of
``serve_cpu.py --long`` (lengths past 8K; SmolLM2's answers there are garbage: speed only).

    .venv/bin/python bench/serve_paired.py --plan configs/smollm2-135m-instruct/profiled.json \\
        --lengths 2048 4096 8000 --rounds 6 --tokens 128
    .venv/bin/python bench/serve_paired.py --long --cached-prefix --lengths 16384 32768 --rounds 6 --tokens 48
    .venv/bin/python bench/serve_paired.py --quick       # smoke run (a test runs it)

Writes ``bench/results/serve_paired-<time>.json`` and prints a table. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from serve_cpu import LONG_ARGS, RESULTS, machine, one_request, prompt, sized_text  # noqa: E402

MEASURES = ("ttft_s", "itl_s", "e2e_s")
DEFAULT_PLAN = ROOT / "configs" / "smollm2-135m-instruct" / "profiled.json"


def summarize(pairs: list[tuple[dict, dict]]) -> dict:
    """Per measure: medians of stock and headwise, the median per-round ratio, and how often headwise
    was at least as fast (a round = one stock and one headwise request of the same length)."""
    out = {}
    for m in MEASURES:
        got = [(s[m], h[m]) for s, h in pairs if s[m] is not None and h[m] is not None]
        if not got:
            continue
        out[m] = {"stock_median": statistics.median(s for s, _ in got),
                  "headwise_median": statistics.median(h for _, h in got),
                  "ratio_median": statistics.median(s / h for s, h in got),
                  "headwise_not_slower": sum(h <= s for s, h in got) / len(got), "rounds": len(got)}
    return out


def main() -> int:
    from openai import OpenAI

    from headwise.server.commands.serve_process import ServerProcess

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default=str(DEFAULT_PLAN), help="the plan headwise serves (default: the default plan)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    ap.add_argument("--rounds", type=int, default=6, help="stock/headwise pairs per length")
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 tokens of prompt, 8 of output, 2 rounds")
    ap.add_argument("--cached-prefix", action="store_true",
                    help="requests of a length share their body as a cached prefix (decode at long context "
                         "without a long prefill per round; TTFT is then a cache hit's)")
    ap.add_argument("--long", action="store_true", help="serve a YaRN-stretched 40K context (lengths past 8K)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/serve_paired-<time>.json)")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.rounds, args.tokens = [256], 2, 8
    if args.rounds < 1 or args.tokens < 2:
        ap.error("--rounds must be >= 1 and --tokens >= 2 (for a latency)")
    if not Path(args.plan).is_file():
        ap.error(f"--plan: {args.plan} is not a file")
    if max(args.lengths) > 8000 and not args.long:
        ap.error(f"--lengths {max(args.lengths)}: past SmolLM2's 8K context; add --long (a YaRN-stretched 40K context)")
    extra = LONG_ARGS if args.long else []

    def text(body: str) -> str:
        if args.cached_prefix:  # the body first: every request of this length hits the same cached prefix
            return f"{body}\nRequest {uuid.uuid4().hex[:12]}. Summarise the text above in one long paragraph."
        return prompt(body)
    out = Path(args.out) if args.out else RESULTS / f"serve_paired-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / (out.stem + "-logs")
    logs.mkdir(exist_ok=True)
    result = {"info": machine(), "config": {"plan": str(Path(args.plan).resolve()), "lengths": args.lengths,
                                            "rounds": args.rounds, "tokens": args.tokens, "cached_prefix": args.cached_prefix,
                                            "long": args.long, "command": " ".join(sys.argv)},
              "lengths": []}
    with ServerProcess(["--no-headwise", *extra], log_path=logs / "serve-stock.log") as stock, \
            ServerProcess(["--plan", str(Path(args.plan).resolve()), *extra], log_path=logs / "serve-headwise.log") as hw:
        clients = {}
        for name, server in (("stock", stock), ("headwise", hw)):
            c = OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=3600, max_retries=0)
            clients[name] = (c, c.models.list().data[0].id, server)
        for c, model, _ in clients.values():
            one_request(c, model, prompt("Hello."), 4)  # warm-up: first-call costs out of the figures
        for n in args.lengths:
            c, model, server = clients["stock"]
            body = sized_text(server.url, model, n)  # the same tokenizer serves both
            if args.cached_prefix:  # each server prefills the shared prefix once, outside the figures
                for name in ("stock", "headwise"):
                    c, model, _ = clients[name]
                    one_request(c, model, text(body), 2)
            pairs = []
            for r in range(args.rounds):
                order = ("stock", "headwise") if r % 2 == 0 else ("headwise", "stock")
                got = {}
                for name in order:
                    c, model, _ = clients[name]
                    got[name] = one_request(c, model, text(body), args.tokens)
                pairs.append((got["stock"], got["headwise"]))
                print(f"  {n:>6} round {r + 1}: stock ITL {1e3 * got['stock']['itl_s']:.1f} ms, headwise "
                      f"{1e3 * got['headwise']['itl_s']:.1f} ms; TTFT {got['stock']['ttft_s']:.2f} / "
                      f"{got['headwise']['ttft_s']:.2f} s", file=sys.stderr, flush=True)
            row = {"length": n, "prompt_tokens": pairs[0][0]["prompt_tokens"], "summary": summarize(pairs),
                   "pairs": [{"stock": s, "headwise": h} for s, h in pairs]}
            result["lengths"].append(row)
            out.write_text(json.dumps(result, indent=1))  # partial results survive an interrupted run
    result["info"]["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=1))
    print(f"{'length':>7} {'measure':>8} {'stock':>10} {'headwise':>10} {'ratio':>7} {'not slower':>11}")
    for row in result["lengths"]:
        for m, s in row["summary"].items():
            print(f"{row['length']:>7} {m:>8} {s['stock_median']:>10.4f} {s['headwise_median']:>10.4f} "
                  f"{s['ratio_median']:>6.3f}x {s['headwise_not_slower']:>10.0%}")
    print(f"# wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
