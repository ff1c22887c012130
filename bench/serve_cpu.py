"""What a user gets: ``headwise serve`` against stock vLLM, through HTTP and the official client.

Every server is started the way a user starts it (``headwise serve``; stock is
``headwise serve --no-headwise``, i.e. vLLM's own CPU attention with the same defaults), then
driven with the ``openai`` client: streamed chat completions, greedy, ``ignore_eos`` so every
request generates exactly ``--tokens`` tokens. Per prompt length:

* ``--sequential`` requests one after the other: time to first token, inter-token latency (the
  mean gap between streamed tokens after the first), end-to-end time;
* then ``--concurrent`` requests at once: output tokens per second over the batch's wall time.

Stock runs first and again last; every headwise figure is a ratio to the mean of the two stock
runs (TTFT, ITL and end-to-end as stock / headwise, so > 1 means headwise is faster; tokens/s as
headwise / stock). Each prompt starts with a distinct nonce so prefix caching never serves a
prompt from an earlier one. Prompt lengths are user-message tokens as counted by the server's
``/tokenize`` route.

    .venv/bin/python bench/serve_cpu.py                         # 1K/2K/4K/8K, default + dense plans
    .venv/bin/python bench/serve_cpu.py --plans configs/smollm2-135m-instruct/mixed.json
    .venv/bin/python bench/serve_cpu.py --long                  # adds 16K/32K (YaRN-stretched SmolLM2)
    .venv/bin/python bench/serve_cpu.py --quick                 # tiny smoke run, stock once (the test runs this)

``--long`` serves SmolLM2 past its trained 8K context with a YaRN override; the model's answers
there are garbage for stock and headwise alike, so those lengths measure speed only.

Writes ``bench/results/serve_cpu-<time>.json`` and a PNG beside it (ratio to stock per length and
measure), and prints a table. Slow on 2 cores: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PLAN_DIR = ROOT / "configs" / "smollm2-135m-instruct"
RESULTS = ROOT / "bench" / "results"
DEFAULT_PLANS = [str(PLAN_DIR / "profiled.json"), str(PLAN_DIR / "dense.json")]  # the default plan first
LONG_LENGTHS = [16384, 32768]
LONG_ARGS = ["--max-model-len", "40960", "--hf-overrides", json.dumps({
    "rope_scaling": {"rope_type": "yarn", "factor": 5.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 40960})]
MEASURES = ("ttft_s", "itl_s", "e2e_s", "concurrent_tok_s")
_SENTENCES = (
    "The harbor keeps a ledger of every ship that leaves before dawn.",
    "A violet lamp burns in the tower where the old clockmaker works.",
    "Rain on the slate roof sounds like a crowd whispering far away.",
    "The baker folds the dough twice and lets it rest near the stove.",
    "Falcons circle the quarry while the workers eat their bread at noon.",
    "Somebody painted the meadow gate green, and nobody remembers who.",
)


# ----------------------------------------------------------------------------- prompts
def _filler(words: int) -> str:
    out, i = [], 0
    while len(out) < words:
        out.extend(_SENTENCES[i % len(_SENTENCES)].split())
        i += 1
    return " ".join(out[:words])


def count_tokens(url: str, model: str, text: str) -> int:
    import httpx

    r = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False}, timeout=60)
    r.raise_for_status()
    return int(r.json()["count"])


def sized_text(url: str, model: str, tokens: int) -> str:
    """Filler of ``tokens`` tokens (within ~1%) under the served tokenizer, found by bisection."""
    lo, hi = 1, max(8, tokens * 2)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(url, model, _filler(mid)) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return _filler(lo)


def prompt(body: str) -> str:
    """A distinct nonce first (no prefix-cache hits across requests), then the body and a question."""
    return f"Request {uuid.uuid4().hex[:12]}. {body}\nSummarise the text above in one long paragraph."


# ----------------------------------------------------------------------------- profile
class Profile:
    """Where one request's prefill went, per layer, from the server's ``/v1/headwise/stats`` with
    ``HEADWISE_PROFILE=1``: the counters before the request minus those just after its first token
    (read ``SETTLE_S`` later, past the workers' publishing interval; the few decode steps run by then
    are counted in ``tokens``). Both stock (``stock_timing``) and headwise publish the same parts."""

    SETTLE_S = 0.7

    def __init__(self, url: str):
        self.url = url
        self.before = self._read()
        self._first: threading.Thread | None = None
        self._after_first: dict | None = None

    def _read(self) -> dict:
        import httpx

        r = httpx.get(f"{self.url}/v1/headwise/stats", timeout=60)
        r.raise_for_status()
        return r.json()

    def first_token(self) -> None:
        def later() -> None:
            time.sleep(self.SETTLE_S)
            self._after_first = self._read()

        self._first = threading.Thread(target=later, daemon=True)  # the client keeps streaming meanwhile
        self._first.start()

    def result(self) -> dict:
        """The prefill's delta; under ``decode``, the rest of the request's (first token to end)."""
        if self._first is not None:
            self._first.join()
        if self._after_first is None:
            return {"error": "no first token was streamed"}
        time.sleep(self.SETTLE_S)  # the last decode steps published
        prefill = profile_delta(self.before, self._after_first)
        if "error" not in prefill:
            prefill["decode"] = profile_delta(self._after_first, self._read())
        return prefill


def profile_delta(before: dict, after: dict) -> dict:
    """Per-layer seconds (attention call, each timed part, host = call minus its timed parts) and
    prefill density between two stats reads; ``per_step``: the same totals per scheduler step."""
    if not after.get("profiling"):
        return {"error": "the server does not profile (HEADWISE_PROFILE=1 did not reach its workers)"}
    layers = []
    for b, a in zip(before["layers"], after["layers"]):
        parts = {p: a["part_seconds"][p] - b["part_seconds"][p] for p in a["part_seconds"]}
        call = a["attention_seconds"] - b["attention_seconds"]
        kept = a["kept_keys"]["prefill"] - b["kept_keys"]["prefill"]
        causal = a["causal_keys"]["prefill"] - b["causal_keys"]["prefill"]
        layers.append({"layer": a["layer"], "attention_s": call,
                       "host_s": call - sum(v for p, v in parts.items() if p != "kv_write"),
                       **{f"{p}_s": v for p, v in parts.items()},
                       "prefill_density": kept / causal if causal else None})
    total = {k: sum(layer[k] for layer in layers) for k in layers[0] if k.endswith("_s")} if layers else {}
    dens = [(layer["prefill_density"], layer["attention_s"]) for layer in layers if layer["prefill_density"]]
    return {"backends": after.get("backends"), "plan": after.get("plan"),
            "tokens": {ph: after["tokens"][ph] - before["tokens"][ph] for ph in after["tokens"]},
            "steps": after["steps"] - before["steps"],
            "plan_s": after["step_part_seconds"]["plan"] - before["step_part_seconds"]["plan"],
            "total": total,
            "per_step_ms": {k: 1e3 * v / max(1, after["steps"] - before["steps"]) for k, v in total.items()},
            "prefill_density": (sum(d for d, _ in dens) / len(dens)) if dens else None,
            "layers": layers}


def profile_table(result: dict) -> str:
    """Markdown: per run and length, the prefill's attention split into its parts (seconds summed over
    layers), and against stock the goal ratio: attention per layer / (density x stock's)."""
    lines = ["| server | prompt | TTFT s | attention s | kernel s | index s | copy s | select s | host s | "
             "kv write s | plan s | prefill density | attention / (density x stock) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    stock = [r for r in result["runs"] if r["label"].startswith("stock")]
    for run in result["runs"]:
        for i, row in enumerate(run["rows"]):
            prof = row.get("profile")
            if not prof or "error" in prof:
                continue
            t, dens = prof["total"], prof["prefill_density"]
            base = _mean([s["rows"][i].get("profile", {}).get("total", {}).get("attention_s") for s in stock])
            goal = f"{t['attention_s'] / (dens * base):.2f}" if dens and base and "stock" not in run["label"] else ""
            lines.append(
                f"| {run['label']} | {row['prompt_tokens']} | {row['ttft_s']:.1f} | {t['attention_s']:.2f} | "
                f"{t['kernel_s']:.2f} | {t['index_s']:.2f} | {t['copy_s']:.2f} | {t['select_s']:.2f} | "
                f"{t['host_s']:.2f} | {t['kv_write_s']:.2f} | {prof['plan_s']:.2f} | "
                f"{'' if dens is None else f'{dens:.4f}'} | {goal} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- requests
def one_request(client, model: str, text: str, tokens: int, on_first=None) -> dict:
    """One streamed request; ``on_first()`` is called (once) when the first token arrives."""
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=tokens, temperature=0.0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    stamps, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            if on_first is not None and len(stamps) == 1:
                on_first()
    end = time.perf_counter()
    out_tokens = usage.completion_tokens if usage else len(stamps)
    gaps = (stamps[-1] - stamps[0]) / (out_tokens - 1) if len(stamps) > 1 and out_tokens > 1 else None
    return {"ttft_s": stamps[0] - start if stamps else None, "itl_s": gaps, "e2e_s": end - start,
            "prompt_tokens": usage.prompt_tokens if usage else None, "completion_tokens": out_tokens}


def measure_server(label: str, serve_args: list[str], lengths: list[int], args, log) -> dict:
    from openai import OpenAI

    from headwise.server.commands.serve_process import ServerProcess

    log_path = Path(args.log_dir) / f"serve-{label}-{int(time.time())}.log"
    started = time.perf_counter()
    with ServerProcess(serve_args, log_path=log_path) as server:
        startup = time.perf_counter() - started
        client = OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=3600, max_retries=0)
        model = client.models.list().data[0].id
        bodies = {n: sized_text(server.url, model, n) for n in lengths}
        one_request(client, model, prompt(bodies[lengths[0]]), 4)  # warm-up: first-call costs out of the figures
        rows = []
        for n in lengths:
            profile = Profile(server.url) if args.profile else None
            seq = [one_request(client, model, prompt(bodies[n]), args.tokens,
                               on_first=profile.first_token if profile and i == 0 else None)
                   for i in range(args.sequential)]
            row = {"length": n, "prompt_tokens": seq[0]["prompt_tokens"],
                   **{m: _mean([r[m] for r in seq]) for m in ("ttft_s", "itl_s", "e2e_s")}, "sequential": seq}
            if profile is not None:
                row["profile"] = profile.result()
            if args.concurrent:
                wall = time.perf_counter()
                with cf.ThreadPoolExecutor(args.concurrent) as pool:
                    conc = list(pool.map(lambda _: one_request(client, model, prompt(bodies[n]), args.tokens),
                                         range(args.concurrent)))
                wall = time.perf_counter() - wall
                row |= {"concurrent_tok_s": sum(r["completion_tokens"] for r in conc) / wall,
                        "concurrent_ttft_s": _mean([r["ttft_s"] for r in conc]), "concurrent": conc}
            rows.append(row)
            conc_note = f"  {args.concurrent}-at-once {row['concurrent_tok_s']:.1f} tok/s" if args.concurrent else ""
            log(f"  {label:>10} {n:>6}: TTFT {row['ttft_s']:.2f}s  ITL {1e3 * row['itl_s']:.1f}ms  "
                f"e2e {row['e2e_s']:.1f}s{conc_note}")
    return {"label": label, "serve_args": serve_args, "startup_s": startup, "rows": rows, "log": str(log_path)}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------------------- ratios, output
def ratios(stock_runs: list[dict], run: dict) -> list[dict]:
    out = []
    for i, row in enumerate(run["rows"]):
        base = {m: _mean([s["rows"][i].get(m) for s in stock_runs]) for m in MEASURES}
        r = {"length": row["length"]}
        for m in MEASURES:
            if base[m] and row.get(m):
                r[m] = row[m] / base[m] if m == "concurrent_tok_s" else base[m] / row[m]
        out.append(r)
    return out


def plot(result: dict, path: Path) -> None:
    if not any(r for rows in result["ratios"].values() for r in rows if len(r) > 1):
        return  # no stock run (a --no-stock probe): nothing to draw
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"ttft_s": "TTFT", "itl_s": "inter-token latency", "e2e_s": "end-to-end", "concurrent_tok_s":
             f"{result['config']['concurrent']}-at-once tok/s"}
    measures = [m for m in MEASURES if any(m in r for rows in result["ratios"].values() for r in rows)]
    fig, axes = plt.subplots(1, len(measures), figsize=(4 * len(measures), 3.4), sharey=False, squeeze=False)
    axes = axes[0]
    for ax, m in zip(axes, measures):
        for label, rows in result["ratios"].items():
            xs = [r["length"] for r in rows if m in r]
            ax.plot(xs, [r[m] for r in rows if m in r], marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(names[m], fontsize=10)
        ax.set_xlabel("prompt tokens")
    axes[0].set_ylabel("× stock (higher = headwise better)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"headwise serve vs stock vLLM, {result['info']['cpu']} ({result['info']['cpu_count']} cores)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    import vllm

    return {"host": socket.gethostname(), "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "vllm": getattr(vllm, "__version__", "?"),
            "loadavg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", nargs="+", default=DEFAULT_PLANS, help="plan files served by headwise")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    ap.add_argument("--tokens", type=int, default=256, help="output tokens per request (ignore_eos)")
    ap.add_argument("--sequential", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--long", action="store_true", help=f"add {LONG_LENGTHS} with a YaRN-stretched context")
    ap.add_argument("--profile", action="store_true",
                    help="serve with HEADWISE_PROFILE=1 and record where each length's first prefill went, per layer "
                         "(stock and headwise alike; written into the JSON and a -profile.md table)")
    ap.add_argument("--no-stock", action="store_true",
                    help="a probe: the plans' servers only (no stock runs, so no ratios)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny lengths, 8 tokens, one plan, stock once")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `headwise serve` flag (repeatable)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/serve_cpu-<time>.json)")
    ap.add_argument("--log-dir", default=None, help="server logs (default: beside the JSON)")
    args = ap.parse_args()
    if args.concurrent < 0 or args.sequential < 1 or args.tokens < 2:
        ap.error("--concurrent must be >= 0 (0: none), --sequential >= 1 and --tokens >= 2 (for a latency)")
    if args.profile:
        os.environ["HEADWISE_PROFILE"] = "1"  # reaches every server's workers (ServerProcess passes the environment)
    if args.quick:
        args.lengths, args.tokens, args.sequential, args.concurrent = [128, 384], 8, 1, 2
        args.plans = args.plans[:1]
    lengths = list(args.lengths) + (LONG_LENGTHS if args.long else [])
    extra = [*args.serve_arg, *(LONG_ARGS if args.long else [])]
    out = Path(args.out) if args.out else RESULTS / f"serve_cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args.log_dir = args.log_dir or str(out.parent / (out.stem + "-logs"))
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = {"info": machine(), "config": {"lengths": lengths, "tokens": args.tokens, "sequential": args.sequential,
                                            "concurrent": args.concurrent, "extra_serve_args": extra,
                                            "command": " ".join(sys.argv)}, "runs": []}
    order = [("stock", ["--no-headwise"])] + [(Path(p).stem, ["--plan", str(Path(p).resolve())]) for p in args.plans] \
        + ([] if args.quick else [("stock-last", ["--no-headwise"])])  # a smoke run has no drift to bracket
    if args.no_stock:
        order = [o for o in order if o[1] != ["--no-headwise"]]
    for label, serve_args in order:
        log(f"# {label}: headwise serve {' '.join(serve_args + extra)}")
        result["runs"].append(measure_server(label, serve_args + extra, lengths, args, log))
        out.write_text(json.dumps(result, indent=1))  # partial results survive an interrupted run
    stock = [r for r in result["runs"] if r["label"].startswith("stock")]
    result["ratios"] = {r["label"]: ratios(stock, r) for r in result["runs"] if not r["label"].startswith("stock")}
    result["info"]["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    if args.profile:
        table = profile_table(result)
        out.with_name(out.stem + "-profile.md").write_text(
            f"# Where the prefill went, per server and prompt\n\n`{result['config']['command']}`\n\n"
            "Seconds summed over layers, from each length's first request (`/v1/headwise/stats` with "
            "`HEADWISE_PROFILE=1`). host = the attention call minus its timed parts; kv write is vLLM's separate "
            "call before it; plan = the per-step metadata build.\n\n" + table)
        print(table)
    print(f"{'plan':>12} {'length':>7} " + " ".join(f"{m:>17}" for m in MEASURES))
    for label, rows in result["ratios"].items():
        for r in rows:
            print(f"{label:>12} {r['length']:>7} " + " ".join(f"{r.get(m, float('nan')):>16.2f}x" for m in MEASURES))
    png = out.with_suffix(".png")
    log(f"# wrote {out}" + (f" and {png}" if png.exists() else " (no stock run: no ratio plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
