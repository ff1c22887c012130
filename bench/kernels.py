"""Kernel benchmark: headwise sparse prefill / decode against dense and FlexAttention baselines.

    python bench/kernels.py                 # full sweeps on a CUDA GPU (Llama-3.1-8B geometry, bf16)
    python bench/kernels.py --quick         # one point per sweep
    python bench/kernels.py --smoke         # tiny interpreter run (what CI does without a GPU)

Geometry: 32 query heads, 8 KV heads, head dim 128, bf16. Sweeps (issue 3): block-sparse prefill at
densities 5/10/25/50% and lengths 8K/32K/128K against SDPA (flash backend) and FlexAttention with
the same BlockMask; vertical-slash at 128K with the published budgets, index building timed
apart; paged decode at contexts 32K/128K, batch 1/16, top-k 256/2048/8192 against a dense paged
decode. Reported: time, speed-up over dense, TFLOP/s on the FLOPs actually computed (4·D per kept
(query, key) pair per head) and, for decode, the fraction of peak HBM bandwidth on the bytes read.
A table goes to stdout and JSON (device, torch and triton versions) to bench/results/.
Without CUDA it says so, runs a tiny interpreter smoke run and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton decides interpreter vs compiler at import time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from headwise.kernels import (DecodeMode, DecodeSelection, SparseIndex, VarlenIndex,  # noqa: E402
                              decode_attention_reference, masked_attention_reference)

HQ, HKV, D, BM = 32, 8, 128, 64
RESULTS = Path(__file__).resolve().parent / "results"
# peak HBM bandwidth (bytes/s) by device name fragment, from the vendors' data sheets
PEAK_BW = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
           ("A100-SXM4-80GB", 2.04e12), ("A100 80GB PCIe", 1.94e12), ("A100", 1.56e12)]


def block_sparse_mask(h: int, nqb: int, density: float, gen: torch.Generator, device) -> torch.Tensor:
    """``[H, NQB, NKB]`` bool causal block mask: sink block and diagonal block always, the rest at random."""
    causal = torch.ones(nqb, nqb, dtype=torch.bool, device=device).tril()
    keep = torch.rand(h, nqb, nqb, generator=gen, device=device) < density
    keep[:, :, 0] = True
    keep |= torch.eye(nqb, dtype=torch.bool, device=device)
    return keep & causal


def index_from_block_mask(mask: torch.Tensor, q_len: int, block: int = BM) -> SparseIndex:
    """Runs of kept key blocks become ranges (vectorised: no per-block Python)."""
    h, nqb, nkb = mask.shape
    prev = torch.nn.functional.pad(mask[..., :-1], (1, 0))
    nxt = torch.nn.functional.pad(mask[..., 1:], (0, 1))
    starts, ends = mask & ~prev, mask & ~nxt
    count = starts.sum(-1).to(torch.int32)
    r = max(1, int(count.max()))
    ar = torch.arange(nkb, device=mask.device, dtype=torch.int32)
    big = torch.iinfo(torch.int32).max
    s_idx = torch.sort(torch.where(starts, ar, big), dim=-1).values[..., :r]
    e_idx = torch.sort(torch.where(ends, ar, big), dim=-1).values[..., :r]
    live = torch.arange(r, device=mask.device) < count[..., None]
    rs = torch.where(live, s_idx * block, 0)
    re = torch.where(live, torch.clamp((e_idx + 1) * block, max=q_len), 0)
    zc = torch.zeros(h, nqb, 1, dtype=torch.int32, device=mask.device)
    return SparseIndex(rs, re, count, zc, torch.zeros_like(count), q_len)


def block_mask_pairs(mask: torch.Tensor) -> int:
    """Causal (query, key) pairs kept by a block mask (length a multiple of the block)."""
    diag = mask.diagonal(dim1=1, dim2=2).sum().item()
    return int((mask.sum().item() - diag) * BM * BM + diag * BM * (BM + 1) // 2)


def index_pairs(index: SparseIndex) -> int:
    """Kept causal pairs of any index, head by head to bound memory at 128K."""
    return int(sum(index.select_heads([h]).keys_per_query().sum().item() for h in range(index.num_heads)))


def timed(fn, reps: int = 20) -> float:
    """Milliseconds per call (median, CUDA-synchronised) via Triton's do_bench."""
    return float(triton.testing.do_bench(fn, warmup=5, rep=reps * 10))


def device_info() -> dict:
    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sm_count=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1))
        info["peak_hbm_bytes_per_s"] = next((bw for frag, bw in PEAK_BW if frag in p.name), None)
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}), Triton interpreter"
    return info


def _row(kind: str, **kw) -> dict:
    r = {"kind": kind, **kw}
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    return r


def bench_block_sparse(lengths, densities, gen) -> list[dict]:
    from headwise.kernels import sparse_prefill
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for t in lengths:
        q = torch.randn(t, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(t, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(t, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T, D]
        dense_pairs = HQ * t * (t + 1) // 2
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            try:
                t_dense = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                                                                         enable_gqa=True))
            except RuntimeError:  # flash backends without GQA: repeat K/V for the baseline only
                kr, vr = kh.repeat_interleave(HQ // HKV, 1), vh.repeat_interleave(HQ // HKV, 1)
                t_dense = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kr, vr, is_causal=True))
        rows.append(_row("prefill_dense_sdpa", seq=t, ms=t_dense, tflops=4 * D * dense_pairs / t_dense / 1e9))
        for dens in densities:
            mask = block_sparse_mask(HQ, t // BM, dens, gen, "cuda")
            index = index_from_block_mask(mask, t)
            pairs = block_mask_pairs(mask)
            t_sparse = timed(lambda: sparse_prefill(q, k, v, index))
            row = dict(seq=t, target_density=dens, density=pairs / dense_pairs, ms=t_sparse,
                       speedup_vs_dense=t_dense / t_sparse, tflops=4 * D * pairs / t_sparse / 1e9)
            try:  # FlexAttention with the same blocks: diagonal blocks partial (causal), the rest full
                diag = torch.eye(t // BM, dtype=torch.bool, device="cuda")
                full = mask & ~diag

                def as_kv(m):
                    return m.sum(-1, dtype=torch.int32)[None], torch.argsort(~m, dim=-1, stable=True).to(torch.int32)[None]

                bmask = BlockMask.from_kv_blocks(*as_kv(mask & diag), *as_kv(full), BLOCK_SIZE=BM,
                                                 mask_mod=lambda b, h, qi, ki: qi >= ki)
                t_flex = timed(lambda: flex(qh, kh, vh, block_mask=bmask, enable_gqa=True))
                out_flex = flex(qh, kh, vh, block_mask=bmask, enable_gqa=True)[0].transpose(0, 1)
                row.update(flex_ms=t_flex, speedup_vs_flex=t_flex / t_sparse,
                           max_abs_diff_vs_flex=float((sparse_prefill(q, k, v, index) - out_flex).abs().max()))
            except Exception as e:  # a baseline failing must not hide our figures
                row["flex_error"] = repr(e)[:200]
            rows.append(_row("prefill_block_sparse", **row))
            del mask, index
    return rows


def bench_vertical_slash(t: int, budgets, gen) -> list[dict]:
    from headwise.kernels import sparse_prefill
    from headwise.patterns.vertical_slash import VerticalSlash, index_from_selection, select

    q = torch.randn(t, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(t, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(t, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    kv_heads = torch.arange(HQ, device="cuda") // (HQ // HKV)
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))
    t_dense = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True))
    dense_pairs = HQ * t * (t + 1) // 2
    rows = []
    for vert, slash in budgets:
        p = VerticalSlash(vertical=vert, slash=slash)

        def build():
            return index_from_selection(*select(p, q, k, kv_heads, 0), t, 0, BM)

        t_build = timed(build, reps=3)
        index = build()
        pairs = index_pairs(index)
        t_sparse = timed(lambda: sparse_prefill(q, k, v, index))
        rows.append(_row("prefill_vertical_slash", seq=t, vertical=vert, slash=slash, density=pairs / dense_pairs,
                         ms=t_sparse, index_build_ms=t_build, dense_ms=t_dense, speedup_vs_dense=t_dense / t_sparse,
                         speedup_incl_build=t_dense / (t_sparse + t_build), tflops=4 * D * pairs / t_sparse / 1e9))
    return rows


def bench_decode(contexts, batches, topks, gen, peak_bw) -> list[dict]:
    from headwise.kernels import sparse_decode

    rows, page = [], 16
    for ctx in contexts:
        for b in batches:
            n_blocks = b * ctx // page
            kv = torch.randn(n_blocks, HKV, page, 2 * D, device="cuda", dtype=torch.bfloat16, generator=gen)
            kc, vc = kv[..., :D], kv[..., D:]
            table = torch.randperm(n_blocks, device="cuda", generator=gen).to(torch.int32).view(b, ctx // page)
            lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            dense = DecodeSelection.uniform(b, HKV, DecodeMode.DENSE, device="cuda")
            t_dense = timed(lambda: sparse_decode(q, kc, vc, table, lens, dense))
            dense_bytes = b * HKV * ctx * D * 2 * 2
            rows.append(_row("decode_dense_paged", ctx=ctx, batch=b, ms=t_dense,
                             hbm_fraction=dense_bytes / (t_dense / 1e3) / peak_bw if peak_bw else None))
            for topk in topks:
                pos = torch.rand(b, HKV, ctx - 1, device="cuda", generator=gen).topk(topk - 1, dim=-1).indices
                pos = torch.sort(torch.cat([pos, torch.full((b, HKV, 1), ctx - 1, device="cuda")], -1), -1).values
                sel = DecodeSelection.uniform(b, HKV, DecodeMode.POSITIONS, indices=pos.to(torch.int32), device="cuda")
                t_sparse = timed(lambda: sparse_decode(q, kc, vc, table, lens, sel))
                read = b * HKV * topk * (D * 2 * 2 + 4)  # K and V rows in bf16 + the int32 position
                rows.append(_row("decode_topk", ctx=ctx, batch=b, topk=topk, ms=t_sparse,
                                 speedup_vs_dense=t_dense / t_sparse,
                                 hbm_fraction=read / (t_sparse / 1e3) / peak_bw if peak_bw else None))
            del kv
    return rows


def smoke() -> list[dict]:
    """Tiny shapes through the Triton kernels (interpreted without CUDA), checked against the reference."""
    from headwise.kernels.decode_triton import sparse_decode_triton
    from headwise.kernels.prefill_triton import sparse_prefill_varlen_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    t, h, hkv, d = 256, 4, 2, 64
    mask = block_sparse_mask(h, t // BM, 0.3, gen, dev)
    index = index_from_block_mask(mask, t)
    q = torch.randn(t, h, d, device=dev, generator=gen)
    k = torch.randn(t, hkv, d, device=dev, generator=gen)
    v = torch.randn(t, hkv, d, device=dev, generator=gen)
    start = time.perf_counter()
    out = sparse_prefill_varlen_triton(q, k, v, [0], VarlenIndex.pack([index], dev))
    ms = (time.perf_counter() - start) * 1e3
    ref, _ = masked_attention_reference(q, k, v, index.to_dense_mask())
    rows = [_row("smoke_prefill", seq=t, ms=ms, max_abs_err=float((out - ref).abs().max()),
                 density=block_mask_pairs(mask) / (h * t * (t + 1) // 2))]
    kv = torch.randn(8, hkv, 16, 2 * d, device=dev, generator=gen)
    table = torch.arange(8, device=dev, dtype=torch.int32).view(2, 4)
    lens = torch.tensor([50, 64], dtype=torch.int32, device=dev)
    qd = torch.randn(2, h, d, device=dev, generator=gen)
    sel = DecodeSelection.uniform(2, hkv, DecodeMode.WINDOW, sink=4, window=16, device=dev)
    start = time.perf_counter()
    out = sparse_decode_triton(qd, kv[..., :d], kv[..., d:], table, lens, sel, num_splits=2)
    ms = (time.perf_counter() - start) * 1e3
    ref, _ = decode_attention_reference(qd, kv[..., :d], kv[..., d:], table, lens, sel.to_dense_mask(lens))
    rows.append(_row("smoke_decode", ms=ms, max_abs_err=float((out - ref).abs().max())))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny interpreter run only")
    ap.add_argument("--quick", action="store_true", help="one point per sweep")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON goes")
    args = ap.parse_args(argv)
    info = device_info()
    print(f"device: {info['device']}  torch {info['torch']}  triton {info['triton']}")
    started = time.time()
    if args.smoke or not torch.cuda.is_available():
        if not torch.cuda.is_available():
            print("no CUDA device: kernel figures need a GPU; running the interpreter smoke test only")
        rows, name = smoke(), "kernels-smoke.json"
    else:
        gen = torch.Generator(device="cuda").manual_seed(0)
        quick = args.quick
        rows = bench_block_sparse([8192] if quick else [8192, 32768, 131072],
                                  [0.1] if quick else [0.05, 0.1, 0.25, 0.5], gen)
        rows += bench_vertical_slash(32768 if quick else 131072,
                                     [(1000, 6096)] if quick else [(1000, 6096), (30, 800), (3500, 100)], gen)
        rows += bench_decode([32768] if quick else [32768, 131072], [1] if quick else [1, 16],
                             [2048] if quick else [256, 2048, 8192], gen, info.get("peak_hbm_bytes_per_s"))
        name = f"kernels-{info['device'].replace(' ', '_')}.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / name
    path.write_text(json.dumps({"info": info, "seconds": round(time.time() - started, 1),
                                "geometry": {"hq": HQ, "hkv": HKV, "head_dim": D, "block_m": BM},
                                "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
