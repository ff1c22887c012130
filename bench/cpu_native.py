"""CPU benchmark: vLLM's own CPU attention op driven by headwise's virtual block tables against the
torch implementation, per layer, for the patterns the CPU engine runs (``server/plugin/cpu_ops.py``).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/cpu_native.py            # 2K/4K/8K
    .venv/bin/python bench/cpu_native.py --lengths 8192 --repeats 9

Geometry: SmolLM2-135M (9 query heads, 3 KV heads, head dim 64), bf16, one request, one layer.
Prefill rows (one whole prompt of ``t`` tokens):

* ``dense``: causal attention, torch kernel vs the op (one request per KV head);
* ``a_shape 64/257 + tail 64``: the default plan's layer (``sparse.json``), torch vs the op;
* ``a_shape 64/513 + tail 64``: a wider window, the op only.

The op reads a paged cache of 32-token pages (the engine's kernel page) through virtual block
tables; the times leave out planning the virtual requests (done once per step, shared by layers). Decode: one query per head over ``t`` cached tokens in the paged cache, the torch
decode (dense selection) vs the op reading the cache directly.

Medians of ``--repeats`` interleaved runs (see ``cpu_attention.py``); JSON to
``bench/results/cpu_native-<host>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_attention import interleaved, machine_info, qkv, write_results  # noqa: E402

from headwise.kernels import SparseIndex, sparse_prefill_torch  # noqa: E402
from headwise.kernels.decode import sparse_decode_torch  # noqa: E402
from headwise.kernels.index import DecodeMode, DecodeSelection  # noqa: E402
from headwise.patterns.a_shape import sink_window_index  # noqa: E402
from headwise.patterns.prefill import with_dense_tail  # noqa: E402
from headwise.patterns.ranges import fast_density  # noqa: E402
from headwise.server.plugin import cpu_ops  # noqa: E402
from headwise.server.plugin.kv_cache import split_kv, write_kv  # noqa: E402

HQ, HKV, D, BM, BLOCK = 9, 3, 64, 64, 128
SCALE = D ** -0.5


def a_shape_tail(t: int, sink: int, window: int, tail: int) -> SparseIndex:
    full = lambda v: torch.full((HQ,), v, dtype=torch.long)  # noqa: E731
    return with_dense_tail(sink_window_index(full(sink), full(window), t, 0, BM), tail)


def paged(k: torch.Tensor, v: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k, v [S, Hkv, D]`` written into a paged cache of ``page``-token blocks (scattered row)."""
    t = k.shape[0]
    nb = -(-t // page)
    row = torch.randperm(nb, generator=torch.Generator().manual_seed(t)).to(torch.int32)
    kv = torch.zeros(nb, HKV, page, 2 * D, dtype=k.dtype)
    write_kv(k, v, kv, (row.long().repeat_interleave(page) * page + torch.arange(page).repeat(nb))[:t])
    return kv, row


def prefill_rows(t: int, repeats: int) -> list[dict]:
    q, k, v = qkv(t, seed=t)
    kv, row = paged(k, v, 32)
    indices = {"dense": SparseIndex.dense(HQ, t), "a_shape 64/257 + tail 64": a_shape_tail(t, 64, 257, 64),
               "a_shape 64/513 + tail 64": a_shape_tail(t, 64, 513, 64)}
    calls = {name: cpu_ops.plan_prefill(index, row, 32, HKV, D, q.dtype) for name, index in indices.items()}
    fns = {"dense torch": lambda: sparse_prefill_torch(q, k, v, indices["dense"], SCALE),
           "a_shape 64/257 + tail 64 torch": lambda: sparse_prefill_torch(q, k, v, indices["a_shape 64/257 + tail 64"], SCALE)}
    for name in indices:
        fns[f"{name} op"] = lambda c=calls[name]: cpu_ops.run(q, kv, c, SCALE)
    res = interleaved(fns, repeats)
    base = res["dense torch"]["wall_s"]
    rows = []
    for name, r in res.items():
        pattern, impl = name.rsplit(" ", 1)
        rows.append(dict(kind="prefill", pattern=pattern, impl=impl, seq=t, density=fast_density(indices[pattern]),
                         wall_s=r["wall_s"], cpu_s=r["cpu_s"], wall_ratio_to_dense_torch=r["wall_s"] / base))
        print(f"{t:6d} prefill {name:34s} density {rows[-1]['density']:.3f} wall {r['wall_s'] * 1e3:8.2f} ms "
              f"(x{rows[-1]['wall_ratio_to_dense_torch']:.2f} of dense torch)", flush=True)
    return rows


def decode_rows(t: int, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(t)
    nb = -(-t // BLOCK)
    kv = torch.zeros(nb, HKV, BLOCK, 2 * D, dtype=torch.bfloat16)
    table = torch.randperm(nb, generator=g).to(torch.int32).view(1, -1)
    slots = torch.tensor([int(table[0, p // BLOCK]) * BLOCK + p % BLOCK for p in range(t)])
    write_kv(torch.randn(t, HKV, D, generator=g), torch.randn(t, HKV, D, generator=g), kv, slots)
    q = torch.randn(1, HQ, D, generator=g).bfloat16()
    lens = torch.tensor([t], dtype=torch.int32)
    k_cache, v_cache = split_kv(kv)
    dense = DecodeSelection.uniform(1, HQ, DecodeMode.DENSE)
    res = interleaved({"torch": lambda: sparse_decode_torch(q, k_cache, v_cache, table, lens, dense, SCALE),
                       "op": lambda: cpu_ops.decode_dense(q, kv, table, lens, SCALE)}, repeats * 4)
    rows = []
    for impl, r in res.items():
        rows.append(dict(kind="decode", pattern="dense", impl=impl, seq=t, wall_s=r["wall_s"], cpu_s=r["cpu_s"]))
        print(f"{t:6d} decode  dense {impl:28s} wall {r['wall_s'] * 1e3:8.3f} ms", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/cpu_native-<host>.json)")
    args = ap.parse_args()
    if not cpu_ops.available(torch.bfloat16, D):
        print("vLLM's CPU attention op is not available here (a CPU build of vLLM is needed)", file=sys.stderr)
        sys.exit(0)
    info = machine_info(prefill_isa=cpu_ops.CACHE_ISA, cache_isa=cpu_ops.CACHE_ISA,
                        repeats=args.repeats)
    print(f"# {info['cpu']}, {info['threads']} threads, prefill ISA {info['prefill_isa']}, "
          f"load {info['loadavg_start'][0]:.1f}", flush=True)
    rows = []
    for t in args.lengths:
        rows += prefill_rows(t, args.repeats)
        rows += decode_rows(t, args.repeats)
    write_results("cpu_native", info, rows, args.out)


if __name__ == "__main__":
    main()
