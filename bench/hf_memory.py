"""Peak memory of one layer's prefill attention on the transformers path at long context.

Each shipped plan through ``attn_implementation="headwise"`` against transformers' own SDPA
(``sdpa_attention_forward``, the implementation ``from_pretrained`` picks by default), on the
embedded SmolLM2-135M's attention module (9 query heads, 3 KV heads, head dim 64), fp32, one
prompt of ``--length`` tokens with no cached prefix. q/k/v are random with the layouts transformers
hands over (``[1, H, S, D]`` views of ``[1, S, H, D]`` projections).

Memory is what the operating system sees, so allocations inside fused kernels count too: each
configuration runs in a fresh process, which resets its peak resident set (``/proc/self/clear_refs``)
once the model and q/k/v exist, calls the attention function once, and reads the peak back
(``VmHWM``). ``extra`` is that peak minus the resident set before the call; ``layer`` adds the
q/k/v both implementations read. Goal (issue 12): every plan's ``layer`` at 128K <= SDPA's + 10%.

``--profiler`` measures ``headwise profile``'s scoring of one layer instead: ``score_layer`` on the
q/k/v the capture hook hands over (``[S, H, D]``), every default candidate for that length, with
values (the ``output`` objective: the heavier one), in chunks of ``hf.PREFILL_CHUNK`` as the
profiler runs it; one row per ``--lengths`` entry, written to ``hf_memory_profiler_cpu.json``.

    .venv/bin/python bench/hf_memory.py            # 128K, every shipped prefill plan (CPU: ~20 min; run alone)
    .venv/bin/python bench/hf_memory.py --quick    # 4K, SDPA and two plans: the smoke test
    .venv/bin/python bench/hf_memory.py --profiler --lengths 32768,131072   # the profiler's peak per layer
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "configs" / "smollm2-135m-instruct"
# every shipped plan with a sparse prefill pattern, the default first; dense.json runs headwise's own
# dense kernels (the capture path of the profiler)
DEFAULT_PLANS = ["profiled", "a_shape", "vertical_slash", "block_sparse", "strided", "hierarchical",
                 "elastic_window", "mixed", "sparse", "dense"]
GOAL = 1.10


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measure_one(config: str, length: int, layer: int, seed: int) -> dict:
    """In this process: one attention call of ``layer`` over ``length`` tokens; bytes and seconds."""
    import gc

    import torch

    from headwise.server.commands.model import resolve_model
    from headwise.server.plugin import hf

    torch.manual_seed(seed)
    if config == "profiler":
        return _profile_one(length, seed)
    model = hf.load_model(str(resolve_model(None)), dtype="float32")
    module = model.model.layers[layer].self_attn
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    if config == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as attend
    else:
        hf.attach_plan(model, PLANS / f"{config}.json")
        attend = hf.headwise_attention
    q = torch.randn(1, length, hq, d).transpose(1, 2)
    k = torch.randn(1, length, hkv, d).transpose(1, 2)
    v = torch.randn(1, length, hkv, d).transpose(1, 2)
    inputs = sum(x.numel() * x.element_size() for x in (q, k, v))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set restarts from here
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        out, _ = attend(module, q, k, v, None, scaling=module.scaling)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    if not torch.isfinite(out).all():
        raise SystemExit(f"{config}: non-finite attention output")
    extra = (peak - before) * 1024
    return dict(config=config, length=length, layer=layer, seconds=round(seconds, 2), inputs_bytes=inputs,
                output_bytes=out.numel() * out.element_size(), extra_bytes=extra, layer_bytes=inputs + extra,
                rss_before_bytes=before * 1024, peak_rss_bytes=peak * 1024)


def _profile_one(length: int, seed: int) -> dict:
    """In this process: ``score_layer`` of one SmolLM2-shaped layer over ``length`` tokens."""
    import gc

    import torch

    from headwise.patterns.profile import default_candidates, score_layer
    from headwise.server.commands.model import read_geometry, resolve_model
    from headwise.server.plugin import hf

    geo = read_geometry(resolve_model(None))
    hq, hkv, d = geo["num_heads"], geo["num_kv_heads"], geo["head_dim"]
    q, k, v = torch.randn(length, hq, d), torch.randn(length, hkv, d), torch.randn(length, hkv, d)
    candidates = default_candidates(length)
    inputs = sum(x.numel() * x.element_size() for x in (q, k, v))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        score = score_layer(q, k, candidates, layer_heads=hq, layer_kv_heads=hkv, v=v, tail=64,
                            chunk=hf.PREFILL_CHUNK)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    if not (score.mass[:, 0] > 0.999).all():
        raise SystemExit("profiler: dense does not keep every sampled row's mass")
    extra = (peak - before) * 1024
    return dict(config="profiler", length=length, candidates=len(candidates), chunk=hf.PREFILL_CHUNK,
                seconds=round(seconds, 2), inputs_bytes=inputs, extra_bytes=extra, layer_bytes=inputs + extra,
                rss_before_bytes=before * 1024, peak_rss_bytes=peak * 1024)


def _save(path: Path, res: dict) -> None:
    """The results file, replaced whole (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)


def _run_one(config: str, length: int, layer: int, seed: int) -> dict:
    """One configuration in a fresh process (its own peak resident set)."""
    cmd = [sys.executable, __file__, "--one", config, "--length", str(length), "--layer", str(layer),
           "--seed", str(seed)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    rows = [ln[4:] for ln in run.stdout.splitlines() if ln.startswith("ROW ")]
    if run.returncode or not rows:
        raise SystemExit(f"hf_memory: {config} at {length} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(rows[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4K tokens, SDPA and two plans (the smoke test)")
    ap.add_argument("--length", type=int, default=131072, help="prompt tokens (default 131072)")
    ap.add_argument("--plans", default=",".join(DEFAULT_PLANS),
                    help=f"shipped plans (names under {PLANS.relative_to(ROOT)}), comma-separated")
    ap.add_argument("--layer", type=int, default=15, help="the layer whose plan slice runs (default 15)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profiler", action="store_true",
                    help="measure the profiler's scoring of one layer (score_layer) at --lengths instead")
    ap.add_argument("--lengths", default="32768,131072", help="--profiler: prompt lengths, comma-separated")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration in this process
    a = ap.parse_args(argv)
    if a.one:
        print("ROW " + json.dumps(measure_one(a.one, a.length, a.layer, a.seed)), flush=True)
        return 0
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("hf_memory: needs Linux's /proc/self/clear_refs and VmHWM to read a call's peak memory")
    if a.profiler:
        return _profiler_main(a)
    length = 4096 if a.quick else a.length
    plans = ["profiled", "a_shape"] if a.quick else [p.strip() for p in a.plans.split(",") if p.strip()]
    missing = [p for p in plans if not (PLANS / f"{p}.json").is_file()]
    if missing:
        raise SystemExit(f"hf_memory: no shipped plan named {', '.join(missing)} (expected names of "
                         f"{PLANS.relative_to(ROOT)}/*.json)")
    import torch

    res = dict(device=platform.processor() or platform.machine(), torch=torch.__version__,
               python=sys.version.split()[0], quick=a.quick, length=length, layer=a.layer, seed=a.seed,
               command="python bench/hf_memory.py" + (" --quick" if a.quick else f" --length {length}"),
               method="peak resident set of a fresh process around one attention call (VmHWM after "
                      "clear_refs); layer = q/k/v + that peak's excess over the resident set before the call",
               goal=f"layer bytes <= {GOAL:.2f} x SDPA's", rows=[], complete=False)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("hf_memory_quick.json" if a.quick else "hf_memory_cpu.json")

    for config in ["sdpa", *plans]:
        row = _run_one(config, length, a.layer, a.seed)
        base = res["rows"][0]["layer_bytes"] if res["rows"] else row["layer_bytes"]
        row["layer_vs_sdpa"] = round(row["layer_bytes"] / base, 3)
        res["rows"].append(row)
        _save(path, res)
        print(f"{config:15s} {row['seconds']:8.1f} s  extra {row['extra_bytes'] / 2**20:8.1f} MiB  "
              f"layer {row['layer_bytes'] / 2**20:8.1f} MiB  {row['layer_vs_sdpa']:.3f} x SDPA", flush=True)
    res["complete"] = True
    res["worst_vs_sdpa"] = max(r["layer_vs_sdpa"] for r in res["rows"][1:])
    res["goal_met"] = res["worst_vs_sdpa"] <= GOAL
    _save(path, res)
    return 0


def _profiler_main(a) -> int:
    import torch

    try:
        lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"hf_memory: --lengths expects comma-separated token counts, found {a.lengths!r}")
    if a.quick:
        lengths = [4096]
    res = dict(device=platform.processor() or platform.machine(), torch=torch.__version__,
               python=sys.version.split()[0], quick=a.quick, seed=a.seed,
               command="python bench/hf_memory.py --profiler" + (" --quick" if a.quick else f" --lengths {a.lengths}"),
               method="peak resident set of a fresh process around one score_layer call (VmHWM after clear_refs); "
                      "layer = q/k/v + that peak's excess over the resident set before the call; SmolLM2 geometry, "
                      "fp32, random q/k/v, values scored (objective output)",
               rows=[], complete=False)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("hf_memory_profiler_quick.json" if a.quick else "hf_memory_profiler_cpu.json")
    for length in lengths:
        row = _run_one("profiler", length, a.layer, a.seed)
        res["rows"].append(row)
        _save(path, res)
        print(f"profiler {length:8d} tokens {row['seconds']:8.1f} s  extra {row['extra_bytes'] / 2**20:8.1f} MiB  "
              f"layer {row['layer_bytes'] / 2**20:8.1f} MiB", flush=True)
    res["complete"] = True
    _save(path, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
