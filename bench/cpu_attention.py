"""CPU benchmark of the torch sparse prefill (the path vLLM runs on CPU), per pattern family.

    .venv/bin/python bench/cpu_attention.py                      # 2K/4K/8K, all families + plans
    .venv/bin/python bench/cpu_attention.py --lengths 8192 --repeats 7 --threads 1
    .venv/bin/python bench/cpu_attention.py --smoke              # tiny run (what the test does)
    PYTHONPATH=/some/old/copy .venv/bin/python bench/cpu_attention.py --impl oldpkg:sparse_prefill_torch

Geometry: SmolLM2-135M (9 query heads, 3 KV heads, head dim 64), bf16, one request, one layer.
Families, with the budgets of the shipped SmolLM2 plans (``configs/smollm2-135m-instruct``):
dense; A-shape sink/window (64/256 as in ``mixed.json``, 64/512 as in ``a_shape.json``, 128/1024);
vertical-slash with ``mixed.json``'s budget (192 columns incl. 32 sinks, 64 local diagonals) and
``vertical_slash.json``'s (256 columns, 128 diagonals of which 64 local; the 64 others drawn near
the main diagonal, as real heads have them, and drawn uniformly: the worst case); block-sparse
top-8 (random pooled scores: the worst case for sharing keys between blocks); S2 strided (4 local
blocks, stride 4). Selections are synthetic (seeded) and go through the patterns' own index code.
Plans (``--plans``): every layer of a plan, index building included, against ``dense.json``.

Per (family, length): median seconds per layer over ``--repeats`` (variants interleaved in each
repeat, so drift from other processes hits all alike), the ratio to dense at that length, and the
achieved density (kept / causal pairs). Wall clock and process CPU time are both recorded: on a
shared machine CPU time is the steadier of the two. JSON goes to
``bench/results/cpu_attention-<host>.json`` with torch version, CPU model, threads, load and the
OpenMP environment. On a loaded machine run with ``OMP_WAIT_POLICY=PASSIVE`` (or one thread): with
the default active wait, idle OpenMP workers spin on the cores the main thread needs and every
parallel region can stall, which punishes the many short calls of a sparse layer (measured here:
8K vertical-slash 1.5 s with two spinning threads against 0.12 s passive).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

from headwise.kernels import SparseIndex
from headwise.patterns.a_shape import sink_window_index
from headwise.patterns.base import PrefillInputs
from headwise.patterns.block_sparse import BlockSparse, block_keep
from headwise.patterns.ranges import block_bounds, fast_density, make_index, no_columns, ranges_from_mask
from headwise.patterns.strided import Strided
from headwise.patterns.strided import build_prefill as strided_index
from headwise.patterns.vertical_slash import index_from_selection

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PLANS = ROOT / "configs" / "smollm2-135m-instruct"
HQ, HKV, D, BM = 9, 3, 64, 64


# ------------------------------------------------------------------------------ indices
def a_shape(t: int, sink: int, window: int) -> SparseIndex:
    full = lambda v: torch.full((HQ,), v, dtype=torch.long)  # noqa: E731
    return sink_window_index(full(sink), full(window), t, 0, BM)


def vertical_slash(t: int, vertical: int, slash: int, local: int, sink_cols: int, far: str, seed: int) -> SparseIndex:
    """Per head: ``sink_cols`` first columns + random others; ``local`` nearest diagonals + the rest
    drawn within 1024 of the main diagonal (``far="near"``) or anywhere (``far="uniform"``)."""
    g = torch.Generator().manual_seed(seed)
    cols, offs = [], []
    for _ in range(HQ):
        extra = torch.randperm(t - sink_cols, generator=g)[: vertical - sink_cols] + sink_cols
        cols.append(torch.sort(torch.cat([torch.arange(sink_cols), extra])).values)
        span = min(t, 1024) if far == "near" else t
        other = torch.randperm(span - local, generator=g)[: max(0, slash - local)] + local
        offs.append(torch.sort(torch.cat([torch.arange(local), other]), descending=True).values)
    cols_t, offs_t = torch.stack(cols), torch.stack(offs)
    return index_from_selection(cols_t, torch.full((HQ,), cols_t.shape[1]), offs_t,
                                torch.full((HQ,), offs_t.shape[1]), t, 0, BM)


def block_sparse(t: int, top_k: int, seed: int) -> SparseIndex:
    g = torch.Generator().manual_seed(seed)
    bs, be = block_bounds(0, t, BM)
    scores = torch.rand(HQ, bs.shape[0], -(-t // BM), generator=g)
    keep = block_keep(BlockSparse(top_k=top_k), scores, bs, be, BM)
    rs, re, rc = ranges_from_mask(keep, BM, t)
    cols, cc = no_columns(HQ, bs.shape[0], "cpu")
    return make_index(rs, re, rc, cols, cc, t, 0, BM)


def strided(t: int, local: int, stride: int) -> SparseIndex:
    inp = PrefillInputs(heads=list(range(HQ)), num_layer_heads=HQ, q_offset=0, q_len=t, total_len=t,
                        num_layer_kv_heads=HKV)
    return strided_index(Strided(local_blocks=local, vert_stride=stride), inp)


def families(t: int) -> dict[str, SparseIndex]:
    return {
        "dense": SparseIndex.dense(HQ, t),
        "a_shape 64/256": a_shape(t, 64, 256),
        "a_shape 64/512": a_shape(t, 64, 512),
        "a_shape 128/1024": a_shape(t, 128, 1024),
        "vertical_slash 192/64": vertical_slash(t, 192, 64, 64, 32, "near", seed=1),
        "vertical_slash 256/128 near": vertical_slash(t, 256, 128, 64, 30, "near", seed=2),
        "vertical_slash 256/128 uniform": vertical_slash(t, 256, 128, 64, 30, "uniform", seed=3),
        "block_sparse top8": block_sparse(t, 8, seed=4),
        "strided 4/4": strided(t, 4, 4),
    }


# ------------------------------------------------------------------------------ timing
def clock(fn) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(fns: dict, repeats: int) -> dict[str, dict]:
    """Median wall / CPU seconds per variant; every repeat runs all variants once, in turn."""
    for fn in fns.values():  # warm-up (allocator, first-call paths)
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            w, c = clock(fn)
            wall[k].append(w)
            cpu[k].append(c)
    return {k: {"wall_s": statistics.median(wall[k]), "cpu_s": statistics.median(cpu[k]),
                "wall_all_s": wall[k]} for k in fns}


def qkv(t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t, h, D, generator=g).to(torch.bfloat16) for h in (HQ, HKV, HKV))


def bench_families(attn, lengths: list[int], repeats: int) -> list[dict]:
    rows = []
    for t in lengths:
        q, k, v = qkv(t, seed=t)
        idx = families(t)
        res = interleaved({name: (lambda i=i: attn(q, k, v, i)) for name, i in idx.items()}, repeats)
        for name, i in idx.items():
            r = res[name]
            rows.append(dict(kind="layer", family=name, seq=t, density=fast_density(i), wall_s=r["wall_s"],
                             cpu_s=r["cpu_s"], wall_ratio_to_dense=r["wall_s"] / res["dense"]["wall_s"],
                             cpu_ratio_to_dense=r["cpu_s"] / res["dense"]["cpu_s"], wall_all_s=r["wall_all_s"]))
            print(f"{t:6d}  {name:32s} density {rows[-1]['density']:.3f}  wall {r['wall_s'] * 1e3:8.1f} ms "
                  f"(x{rows[-1]['wall_ratio_to_dense']:.2f})  cpu {r['cpu_s'] * 1e3:8.1f} ms "
                  f"(x{rows[-1]['cpu_ratio_to_dense']:.2f})", flush=True)
    return rows


def bench_plans(attn, plan_paths: list[Path], lengths: list[int], repeats: int) -> list[dict]:
    """Every layer of each plan: index building (the plugin's entry point) + attention, against
    dense attention for every layer. One random q/k/v is reused by all layers."""
    from headwise.patterns.plan import load_plan
    from headwise.patterns.prefill import build_layer_prefill_index

    rows = []
    for t in lengths:
        q, k, v = qkv(t, seed=t)
        dense = SparseIndex.dense(HQ, t)

        def run_plan(plan, runs: list):
            cache: dict = {}
            split = {"build_cpu_s": 0.0, "attention_cpu_s": 0.0, "build_wall_s": 0.0, "attention_wall_s": 0.0}
            for layer in range(plan.model.num_layers):
                c0, w0 = time.process_time(), time.perf_counter()
                index = build_layer_prefill_index(
                    plan.layer_prefill(layer), list(range(HQ)), HQ, q, k, None, 0, t + plan.settings.planned_generation,
                    BM, num_layer_kv_heads=HKV, dense_below=plan.settings.dense_below,
                    dense_tail=plan.settings.dense_tail, cache=cache)
                c1, w1 = time.process_time(), time.perf_counter()
                attn(q, k, v, index)
                split["build_cpu_s"] += c1 - c0
                split["build_wall_s"] += w1 - w0
                split["attention_cpu_s"] += time.process_time() - c1
                split["attention_wall_s"] += time.perf_counter() - w1
            runs.append(split)

        plans = {p.stem: load_plan(p) for p in plan_paths}
        layers = next(iter(plans.values())).model.num_layers
        fns = {"dense (every layer)": lambda: [attn(q, k, v, dense) for _ in range(layers)]}
        runs: dict[str, list] = {}
        for name, plan in plans.items():
            runs[name] = []
            fns[name] = lambda plan=plan, name=name: run_plan(plan, runs[name])
        res = interleaved(fns, repeats)
        base = res["dense (every layer)"]
        for name, r in res.items():
            row = dict(kind="plan", plan=name, seq=t, layers=layers, wall_s=r["wall_s"], cpu_s=r["cpu_s"],
                       wall_ratio_to_dense=r["wall_s"] / base["wall_s"], cpu_ratio_to_dense=r["cpu_s"] / base["cpu_s"])
            if name in runs:  # medians over the timed runs (the first one is the warm-up)
                timed = runs[name][1:]
                row.update({key: statistics.median(x[key] for x in timed) for key in timed[0]})
            rows.append(row)
            print(f"{t:6d}  plan {name:27s} wall {r['wall_s']:7.2f} s (x{row['wall_ratio_to_dense']:.2f})  "
                  f"cpu {r['cpu_s']:7.2f} s (x{row['cpu_ratio_to_dense']:.2f})"
                  + (f"  [cpu: build {row['build_cpu_s']:.2f} s, attention {row['attention_cpu_s']:.2f} s]"
                     if name in runs else ""), flush=True)
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(**extra) -> dict:
    """The machine, versions, threads, OpenMP environment and load a CPU benchmark ran under."""
    return {"host": socket.gethostname(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), **extra,
            "omp_env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")},
            "loadavg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_results(name: str, info: dict, rows: list[dict], out: str | None) -> Path:
    """``{"info", "rows"}`` to ``out`` or ``bench/results/<name>-<host>.json``; returns the path."""
    info["loadavg_end"] = os.getloadavg()
    path = Path(out) if out else RESULTS / f"{name}-{socket.gethostname() or 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(f"# wrote {path}", file=sys.stderr)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--plans", nargs="*", default=["mixed", "a_shape", "vertical_slash", "strided"],
                    help="plan names under configs/smollm2-135m-instruct timed end to end (none: skip)")
    ap.add_argument("--plan-lengths", type=int, nargs="+", default=[8192])
    ap.add_argument("--impl", default="headwise.kernels:sparse_prefill_torch",
                    help="module:function with sparse_prefill_torch's signature (e.g. an older copy)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/cpu_attention-<host>.json)")
    ap.add_argument("--smoke", action="store_true", help="one tiny length, two repeats, no plans")
    args = ap.parse_args()
    if args.smoke:
        args.lengths, args.repeats, args.plans = [256], 2, []
    if args.threads:
        torch.set_num_threads(args.threads)
    mod, fn = args.impl.split(":")
    attn = getattr(importlib.import_module(mod), fn)

    info = machine_info(impl=args.impl, repeats=args.repeats,
                        geometry={"hq": HQ, "hkv": HKV, "head_dim": D, "dtype": "bfloat16"})
    print(f"# {info['cpu']}, torch {info['torch']}, {info['threads']} threads, impl {args.impl}, "
          f"load {info['loadavg_start'][0]:.1f}", flush=True)
    rows = bench_families(attn, args.lengths, args.repeats)
    if args.plans:
        rows += bench_plans(attn, [PLANS / f"{p}.json" for p in args.plans], args.plan_lengths, args.repeats)
    write_results("cpu_attention", info, rows, args.out)


if __name__ == "__main__":
    main()
