"""Index building and decode selection at long context, one layer of Llama-3.1-8B geometry.

32 query heads, 8 KV heads, head dim 128, bf16 q/k with planted structure (sink keys, a few
vertical key columns every query likes, a local diagonal through q ~ k of nearby tokens). For
every prefill family: time and peak *extra* memory to build the index of one 8K chunk at the
end of a 32K..1M context; for every decode family: time per step at batch 1 and 16.

Peak extra memory: every tensor created while building is tracked by a TorchDispatchMode that
adds its storage's bytes when the op returns it and subtracts them when the storage is freed
(weakref finalizer); the peak of that live sum is reported (inputs q/k/cache excluded). On CUDA
``torch.cuda.max_memory_allocated`` minus the baseline is reported instead.

    .venv/bin/python bench/index_scale.py            # full (CPU: a few minutes; run under the lock)
    .venv/bin/python bench/index_scale.py --quick    # seconds: the smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from headwise.kernels.decode_select import PageSummaries, update_page_summaries
from headwise.patterns import block_sparse, hierarchical, hierarchical_decode, page_topk, strided, vertical_slash
from headwise.patterns.base import DecodeInputs, PrefillInputs
from headwise.patterns.hierarchical import Hierarchical
from headwise.patterns.tidal import choose

H, HKV, D = 32, 8, 128
PREFILL = {
    "block_sparse": (block_sparse, block_sparse.BlockSparse(top_k=100)),
    "strided": (strided, strided.Strided(local_blocks=16, vert_stride=8)),
    "hierarchical": (hierarchical, Hierarchical()),
    "vertical_slash": (vertical_slash, vertical_slash.VerticalSlash(vertical=1000, slash=6096)),
}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages created inside the mode and still alive.

    A view (a slice of k, a reshaped cache) shares its base's storage: storages that existed before
    the mode (the inputs) are never counted, however many views of them the builder makes.
    """

    def __init__(self, inputs=()):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()
        self.existing = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.seen and key not in self.existing:
                    self.seen.add(key)
                    n = st.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, n)
        return out


_OWN_WARMUP_S = 5.0  # a call this long is timed once, without a separate warm-up call
_MIN_TIMED_S = 0.5  # shorter calls are repeated until they add up to about this


def measure(fn, repeats: int, inputs=(), memory: bool = True):
    """(seconds per call, peak extra bytes or None); ``inputs``: the tensors ``fn`` reads (not counted).

    A first call over ``_OWN_WARMUP_S`` is taken as the time when one repeat is asked for (its
    warm-up share is negligible), which keeps the 1M batch-16 dense baseline to one call; on CPU a
    first call under ``_MIN_TIMED_S`` is repeated until the repeats add up to about that.
    """
    t0 = time.perf_counter()
    fn()  # warm-up
    first = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / repeats, torch.cuda.max_memory_allocated() - base
    if first < _MIN_TIMED_S:  # short calls repeat until about _MIN_TIMED_S: one ms-scale call is mostly noise
        repeats = max(repeats, min(100, math.ceil(_MIN_TIMED_S / max(first, 1e-4))))
    if repeats == 1 and first > _OWN_WARMUP_S:
        dt = first
    else:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        dt = (time.perf_counter() - t0) / repeats
    if not memory:
        return dt, None
    with LiveBytes(inputs) as lb:
        fn()
    return dt, lb.peak


def planted(s: int, dev, g: torch.Generator):
    """k ``[S, Hkv, D]`` bf16 with sinks, vertical lines and a diagonal; the direction ``u`` the probes like."""
    k = torch.randn(s, HKV, D, generator=g, device="cpu").mul_(0.3)
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    k[:4] += 3 * u
    lines = torch.randint(0, s, (8,), generator=g)
    k[lines] += 3 * u
    return k.to(dev, torch.bfloat16), u


def prefill_rows(contexts, chunk, repeats, dev, g, rows: list, save=lambda: None):
    for s in contexts:
        k, u = planted(s, dev, g)
        q = (torch.randn(chunk, H, D, generator=g).mul_(0.3) + u).to(dev, torch.bfloat16)
        q[:, :, :] += k[s - chunk:, torch.arange(H) // (H // HKV)].float().to(dev).to(torch.bfloat16) * 0.5  # diagonal
        inp = PrefillInputs(heads=list(range(H)), num_layer_heads=H, num_layer_kv_heads=HKV, q_offset=s - chunk,
                            q_len=chunk, total_len=s, q=q, k=k, kv_heads=torch.arange(H) // (H // HKV))
        for name, (mod, spec) in PREFILL.items():
            dt, peak = measure(lambda: mod.build_prefill(spec, inp), repeats, inputs=(q, k))
            rows.append(dict(family=name, context=s, chunk=chunk, seconds=dt, peak_extra_bytes=peak))
            print(f"prefill {name:15s} S={s:>8d}  {dt * 1e3:9.1f} ms  peak {peak / 2**20:8.1f} MiB", flush=True)
            save()
        del k, q
    return rows


def decode_rows(contexts, batches, repeats, dev, g, max_cache_tokens, rows: list, save=lambda: None):
    bsz = 16
    for s in contexts:
        for b in batches:
            if b * s > max_cache_tokens:  # the caches would not fit this machine: rows share one cache
                shared = True
            else:
                shared = False
            n_req = 1 if shared else b
            nblk = -(-s // bsz)
            k_cache = (torch.randn(n_req * nblk, HKV, bsz, D, generator=g) * 0.3).to(dev, torch.bfloat16)
            table = torch.arange(n_req * nblk, dtype=torch.int32, device=dev).view(n_req, nblk)
            table = table.expand(b, -1).contiguous() if shared else table
            lens = torch.full((b,), s, dtype=torch.int32, device=dev)
            q = torch.randn(b, H, D, generator=g).to(dev, torch.bfloat16)
            kvh = torch.arange(H) // (H // HKV)
            summ = PageSummaries.empty(n_req * nblk, bsz, 16, HKV, D, dtype=torch.bfloat16, device=dev)
            slots = torch.arange(n_req * nblk * bsz, device=dev)
            update_page_summaries(summ, k_cache.transpose(1, 2).reshape(-1, HKV, D), slots, bsz)
            inp = DecodeInputs(heads=list(range(H)), num_layer_heads=H, seq_lens=lens, total_lens=lens, q=q,
                               k_cache=k_cache, block_table=table, kv_heads=kvh, scale=1 / math.sqrt(D),
                               num_layer_kv_heads=HKV, max_seq_len=s, page_summaries=summ)
            hip = Hierarchical()
            cases = {
                "tidal_select": lambda: choose(q, inp, 256),
                "page_topk": lambda: page_topk.select_decode(page_topk.PageTopK(budget=1024), inp),
                "hierarchical_refresh_amortised": lambda: hierarchical_decode.select_decode(hip, inp, torch.arange(H)),
                "strided": lambda: strided.select_decode(strided.Strided(), inp),
            }
            kc = k_cache.transpose(1, 2).reshape(n_req, nblk * bsz, HKV, D)[:, :s]
            kc = kc.expand(b, -1, -1, -1) if shared else kc
            kd = kc.transpose(1, 2)  # [B, Hkv, S, D] (a strided view: SDPA reads it in place)
            qd = q.view(b, H, 1, D)
            def dense(qd=qd, kd=kd):  # q and K bound here (a closure would see the deleted names)
                return torch.nn.functional.scaled_dot_product_attention(qd, kd, kd, enable_gqa=True)

            dt_dense, _ = measure(dense, repeats, memory=False)
            rows.append(dict(family="dense_attention_sdpa", context=s, batch=b, seconds=dt_dense, shared_cache=shared))
            print(f"decode  dense attention     S={s:>8d} B={b:<3d} {dt_dense * 1e3:9.2f} ms", flush=True)
            for name, fn in cases.items():
                dt, peak = measure(fn, repeats, inputs=(q, k_cache, table, lens, summ.kmin, summ.kmax))
                if name.startswith("hierarchical"):
                    dt = dt / min(hip.refresh)  # a full run every refresh[-1] steps at least: amortised bound
                rows.append(dict(family=name, context=s, batch=b, seconds=dt, peak_extra_bytes=peak,
                                 fraction_of_dense=dt / dt_dense, shared_cache=shared))
                print(f"decode  {name:20s} S={s:>8d} B={b:<3d} {dt * 1e3:9.2f} ms  {dt / dt_dense:6.1%} of dense", flush=True)
                save()
            del k_cache, summ, kc, kd, dense
    return rows


def slope(rows, family, a, b):
    t = {r["context"]: r["seconds"] for r in rows if r["family"] == family}
    if a in t and b in t:
        return math.log(t[b] / t[a]) / math.log(b / a)
    return None


def plot(rows: list[dict], path: Path) -> None:
    """Log-log time and peak extra memory per 8K chunk against context, one line per prefill family."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for f in PREFILL:
        r = [x for x in rows if x["family"] == f]
        ax[0].loglog([x["context"] for x in r], [x["seconds"] for x in r], "o-", label=f)
        ax[1].loglog([x["context"] for x in r], [max(1, x["peak_extra_bytes"]) / 2**20 for x in r], "o-", label=f)
    ax[0].set(xlabel="context", ylabel="s per 8K chunk")
    ax[1].set(xlabel="context", ylabel="peak extra MiB")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (the smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--contexts", default="32768,131072,524288,1048576")
    ap.add_argument("--decode-contexts", default="32768,131072,1048576")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--replot", metavar="JSON", help="draw the PNG of a results file (a run cut short) and exit")
    a = ap.parse_args(argv)
    if a.replot:
        plot(json.loads(Path(a.replot).read_text())["prefill"], Path(a.replot).with_suffix(".png"))
        return 0
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    if a.quick:
        pre, dec, chunk, batches, reps = [2048, 4096], [2048], 1024, [1, 2], 1
    else:
        pre = [int(x) for x in a.contexts.split(",")]
        dec = [int(x) for x in a.decode_contexts.split(",")]
        chunk, batches, reps = 8192, [1, 16], a.repeats
    rows, drows = [], []
    res = dict(device=torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine(),
               torch=torch.__version__, python=sys.version.split()[0], quick=a.quick, complete=False,
               geometry=dict(heads=H, kv_heads=HKV, head_dim=D), memory_method=(
                   "cuda max_memory_allocated" if dev == "cuda" else "TorchDispatchMode live storage bytes"),
               prefill=rows, decode=drows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "index_scale_quick" if a.quick else f"index_scale_{dev}"

    def save() -> None:  # after every row: a run cut short still leaves what it measured
        res["slope_128k_1m"] = {f: slope(rows, f, 131072, 1048576) for f in PREFILL}
        tmp = out / f".{name}.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out / f"{name}.json")

    prefill_rows(pre, chunk, reps, dev, g, rows, save)
    decode_rows(dec, batches, reps, dev, g, 16 * 131072 if dev == "cpu" else 1 << 40, drows, save)
    res["complete"] = True
    save()
    plot(rows, out / f"{name}.png")
    print(json.dumps(res["slope_128k_1m"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
