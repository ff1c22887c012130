"""End-to-end CPU benchmark: stock vLLM CPU attention vs headwise plans, one run, one JSON.

For every mode (``stock``, then one per plan) a fresh vLLM engine runs in its own process group
(so the ``HEADWISE_ENABLE`` switch differs and memory is returned between modes) and serves
passkey prompts one at a time (batch 1, prefix caching off so every prompt is a real prefill) at
each length. Per prompt it records time to first token and decode tokens/s (from vLLM's request
metrics, engine clock) and whether the reply contains the pass key.

    .venv/bin/python bench/e2e_cpu.py                       # 2K/4K/8K, dense.json + sparse.json
    .venv/bin/python bench/e2e_cpu.py --all-plans           # every plan in configs/smollm2-135m-instruct
    .venv/bin/python bench/e2e_cpu.py --lengths 2000 --trials 1 --plan configs/.../x.json

Stock runs first and again last: on a shared machine the load drifts, and the two stock runs
bracket the headwise ones (speed-ups use their mean; both are in the JSON with the load average).

Lengths are user-message tokens; the chat template adds ~20, so "8K" is 8000 to stay inside the
model's 8192-token context with the generated tokens. Slow on 2 cores: stock attention needs
minutes per 8K prompt. Results: ``bench/results/e2e_cpu-<time>.json`` (+ a table on stdout).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN_DIR = ROOT / "configs" / "smollm2-135m-instruct"
DEFAULT_PLANS = [str(PLAN_DIR / "dense.json"), str(PLAN_DIR / "sparse.json")]  # the product plans
ENGINE_KW = dict(max_model_len=8192, enable_prefix_caching=False, disable_log_stats=False, seed=0)
KV_CACHE_GIB = "2"  # VLLM_CPU_KVCACHE_SPACE: ~90K tokens of SmolLM2 cache, plenty for batch 1


# ------------------------------------------------------------------------- one mode (child)
def run_mode(args: argparse.Namespace) -> None:
    import vllm

    from headwise.server.commands.model import resolve_model
    from headwise.server.commands.tasks import passkey

    model = resolve_model(args.model)
    kw = dict(ENGINE_KW)
    stats_dir = None
    if args.mode != "stock":
        from headwise.server.plugin.plan_binding import validate_plan_for_model
        from headwise.server.plugin import engine_args

        validate_plan_for_model(args.mode, model)
        stats_dir = str(Path(args.out).with_suffix(".stats"))  # inside the orchestrator's temp dir
        kw = engine_args(args.mode, stats_dir=stats_dir, **kw)
    started = time.perf_counter()
    llm = vllm.LLM(model, **kw)
    startup = time.perf_counter() - started
    tok = llm.get_tokenizer()
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(["Warm up the engine with a short prompt."], sp, use_tqdm=False)
    rows = []
    for length in args.lengths:
        for seed in range(args.trials):
            task = passkey(tok, length, seed=seed)
            text = tok.apply_chat_template([{"role": "user", "content": task.prompt}], tokenize=False,
                                           add_generation_prompt=True)
            t0 = time.perf_counter()
            out = llm.generate([text], sp, use_tqdm=False)[0]
            wall = time.perf_counter() - t0
            m = out.metrics
            n_gen = len(out.outputs[0].token_ids)
            ttft = decode_tps = None
            if m is not None and m.first_token_ts:
                ttft = m.first_token_ts - (m.queued_ts or m.scheduled_ts)
                if n_gen > 1 and m.last_token_ts > m.first_token_ts:
                    decode_tps = (n_gen - 1) / (m.last_token_ts - m.first_token_ts)
            reply = out.outputs[0].text
            rows.append({"length": length, "seed": seed, "prompt_tokens": len(out.prompt_token_ids),
                         "ttft_s": ttft, "decode_tokens_per_s": decode_tps, "wall_s": wall,
                         "generated_tokens": n_gen, "correct": task.grade(reply[:80]), "answer": task.answer,
                         "reply": reply[:80]})
            print(json.dumps(rows[-1]), flush=True)
            Path(args.out).write_text(json.dumps({"mode": args.mode, "startup_s": startup, "rows": rows}))
    result = {"mode": args.mode, "startup_s": startup, "rows": rows}
    if stats_dir:
        from headwise.server.plugin.stats import read_stats

        st = read_stats(stats_dir)
        result["headwise_stats"] = {k: st[k] for k in ("backend_active", "steps", "attention_calls", "tokens",
                                                        "requests", "density", "attention_seconds")}
        if not st["backend_active"]:
            raise SystemExit("headwise was asked for but its backend never ran (silent fallback)")
    Path(args.out).write_text(json.dumps(result))


# ------------------------------------------------------------------------ orchestration
def _machine() -> dict:
    import torch
    import vllm

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "vllm": vllm.__version__, "platform": platform.platform(), "git": commit.stdout.strip() or None,
            "torch_threads": torch.get_num_threads()}


def _run_child(mode: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--out", str(out), "--max-tokens", str(args.max_tokens),
           "--trials", str(args.trials), "--lengths", *map(str, args.lengths)]
    if args.model:
        cmd += ["--model", args.model]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWISE_")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    load_before = os.getloadavg()
    print(f"== {mode} (load average {load_before[0]:.1f})", flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # own process group: killable as a whole
    status = "ok"
    try:
        proc.wait(timeout=args.mode_timeout)
    except subprocess.TimeoutExpired:
        status = f"timed out after {args.mode_timeout}s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # engine core + workers outlive a killed parent
        except ProcessLookupError:
            pass
        proc.wait()
    if status == "ok" and proc.returncode:
        status = f"exit code {proc.returncode}"
    result = json.loads(out.read_text()) if out.exists() and out.stat().st_size else {"mode": mode, "rows": []}
    result["status"] = status
    # a shared machine: the load around each mode says how comparable its timings are
    result["load_average_before"], result["load_average_after"] = load_before, os.getloadavg()
    return result


def _summary(result: dict) -> dict:
    by_len: dict[int, dict] = {}
    for r in result["rows"]:
        s = by_len.setdefault(r["length"], {"n": 0, "correct": 0, "ttft": [], "tps": []})
        s["n"] += 1
        s["correct"] += bool(r["correct"])
        if r["ttft_s"] is not None:
            s["ttft"].append(r["ttft_s"])
        if r["decode_tokens_per_s"] is not None:
            s["tps"].append(r["decode_tokens_per_s"])
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {str(k): {"prompts": v["n"], "passkey_accuracy": v["correct"] / v["n"], "ttft_s": mean(v["ttft"]),
                     "decode_tokens_per_s": mean(v["tps"])} for k, v in sorted(by_len.items())}


def _add_speedups(results: list[dict]) -> None:
    """TTFT speed-up of every mode over the mean stock TTFT at the same length."""
    stock: dict[str, list[float]] = {}
    for r in results:
        if r["mode"] == "stock":
            for k, v in r["summary"].items():
                if v["ttft_s"]:
                    stock.setdefault(k, []).append(v["ttft_s"])
    for r in results:
        r["ttft_speedup_vs_stock"] = {
            k: (sum(stock[k]) / len(stock[k]) / v["ttft_s"]) if k in stock and v["ttft_s"] else None
            for k, v in r["summary"].items()}


def _print_table(results: list[dict]) -> None:
    fmt = lambda x, f: f"{x:{f}}" if x is not None else "-"  # noqa: E731
    print(f"\n{'mode':<24} {'load':>5} {'len':>6} {'acc':>5} {'TTFT s':>8} {'x stock':>8} {'dec tok/s':>10}")
    for r in results:
        name = "stock" if r["mode"] == "stock" else Path(r["mode"]).name
        load = r.get("load_average_before", [None])[0]
        for k, s in r["summary"].items():
            sp = r["ttft_speedup_vs_stock"].get(k)
            print(f"{name:<24} {fmt(load, '5.1f'):>5} {k:>6} {s['passkey_accuracy']:>5.2f} "
                  f"{fmt(s['ttft_s'], '8.2f'):>8} {fmt(sp, '8.2f'):>8} {fmt(s['decode_tokens_per_s'], '10.1f'):>10}")
        if r["status"] != "ok":
            print(f"{name}: {r['status']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", action="append", default=None,
                   help="headwise plan (repeatable); default: the shipped dense.json and sparse.json")
    p.add_argument("--all-plans", action="store_true", help="every plan in configs/smollm2-135m-instruct")
    p.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000, 8000])
    p.add_argument("--trials", type=int, default=2, help="passkey prompts (seeds) per length")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--mode-timeout", type=int, default=1800, help="seconds per engine (mode)")
    p.add_argument("--no-stock", action="store_true")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.mode = args.child
        run_mode(args)
        return 0
    chosen = sorted(glob.glob(str(PLAN_DIR / "*.json"))) if args.all_plans else (args.plan or DEFAULT_PLANS)
    plans = [str(Path(x).resolve()) for x in chosen]
    modes = plans if args.no_stock else ["stock", *plans, "stock"]
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"e2e_cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    doc = {"benchmark": "e2e_cpu", "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": _machine(),
           "engine": ENGINE_KW, "kv_cache_gib": KV_CACHE_GIB, "lengths": args.lengths, "trials": args.trials,
           "max_tokens": args.max_tokens, "results": []}
    with tempfile.TemporaryDirectory(prefix="headwise-bench-") as tmp:
        for i, mode in enumerate(modes):
            r = _run_child(mode, args, Path(tmp) / f"mode{i}.json")
            r["summary"] = _summary(r)
            doc["results"].append(r)
            _add_speedups(doc["results"])
            out.write_text(json.dumps(doc, indent=2) + "\n")  # after every mode: a cut-off run keeps its figures
    _print_table(doc["results"])
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
