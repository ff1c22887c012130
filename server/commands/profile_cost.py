"""What each candidate prefill pattern costs on this device: measured, not read off its density.

A pattern's density says how many (query, key) pairs it keeps; what a user pays is time, and the
two differ: an estimated pattern (vertical-slash, block-sparse) pays for its estimation, a kept key
set that is not made of whole cache pages is rounded up to them on vLLM's CPU op, and the op's
cost per pair depends on the shape of the work. So the profiler times every candidate the way the
server runs it, for one layer of the model's geometry over a whole prompt of each calibration
length, in chunked-prefill chunks:

* CPU with vLLM's op: the chunk's index (``build_prefill``, estimation included), its op schedule
  over a real paged cache in the layout the server keeps (``cpu_ops.plan_prefill``, the page the
  server would use for the pattern) and the op call (``cpu_ops.run``);
* elsewhere (CUDA, or a CPU without the op): the index and the sparse prefill kernel the server
  launches (``kernels.sparse_prefill_paged`` over a paged cache).

``measure_costs`` returns seconds per candidate and length; the profiler's budget is the plan's
attention time relative to dense at every length (``relative``). Random q/k: a static pattern's
cost does not depend on the data, and an estimated one keeps a fixed budget of keys.

``measure_decode_costs`` does the same for the decode candidates (dense, sink + window): one decode
step of one layer, on vLLM's op or the sparse decode kernel as the server routes it
(``patterns.profile_decode.DecodeCosts``, priced by ``decode_plan_cost``).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

VLLM_CHUNK = 2048  # queries per chunked-prefill step (the server's --max-num-batched-tokens on CPU)


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and the op's one-time setup out of the figure
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_costs(candidates: Sequence, num_heads: int, num_kv_heads: int, head_dim: int, lengths: Sequence[int], *,
                  device: str = "cpu", dtype: torch.dtype = torch.bfloat16, chunk: int = VLLM_CHUNK,
                  repeats: int = 2, block_m: int = 64, log=None) -> np.ndarray:
    """``[C, N]`` seconds of one layer's prefill attention over a whole prompt of each length."""
    from headwise import kernels
    from headwise.patterns.base import PrefillInputs
    from headwise.patterns.prefill import build_prefill
    from headwise.server.plugin import cpu_ops, pages
    from headwise.server.plugin.kv_cache import split_kv, write_kv
    from headwise.server.plugin.plan_binding import COARSE_PREFILL, FINE_PAGE, VLLM_CPU_BLOCK

    use_op = device == "cpu" and cpu_ops.available(dtype, head_dim)
    gen = torch.Generator().manual_seed(0)
    scale = head_dim ** -0.5
    kv_heads = torch.arange(num_heads) // (num_heads // num_kv_heads)
    out = np.zeros((len(candidates), len(lengths)))
    for li, n in enumerate(lengths):
        q = torch.randn(n, num_heads, head_dim, generator=gen).to(dtype).to(device)
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
        caches: dict[int, tuple] = {}

        def cache(page: int):
            """A one-request paged cache holding k/v, in the layout the server keeps for ``page``."""
            if page not in caches:
                blocks = -(-n // page)
                kv = torch.zeros(blocks, num_kv_heads, page, 2 * head_dim, dtype=dtype, device=device)
                isa = cpu_ops.cache_isa(dtype, page, head_dim, False) if use_op else cpu_ops.CACHE_ISA
                write_kv(k, v, kv, torch.arange(n, device=device), isa)
                caches[page] = (kv, isa, torch.arange(blocks, dtype=torch.int32, device=device))
            return caches[page]

        for ci, spec in enumerate(candidates):
            page = VLLM_CPU_BLOCK if spec.type in COARSE_PREFILL else FINE_PAGE
            kv, isa, block_row = cache(page)
            views = cpu_ops.page_views(kv) if use_op else None
            k_cache, v_cache = (None, None) if use_op else split_kv(kv)

            def run_prompt() -> None:
                for start in range(0, n, chunk):
                    end = min(n, start + chunk)
                    inp = PrefillInputs(heads=list(range(num_heads)), num_layer_heads=num_heads, q_offset=start,
                                        q_len=end - start, total_len=n, q=q[start:end], k=k[:end], kv_heads=kv_heads,
                                        block_m=block_m, num_layer_kv_heads=num_kv_heads, scale=scale)
                    index = build_prefill(spec, inp)
                    if use_op:
                        sched = cpu_ops.plan_prefill(index, block_row, page, num_kv_heads, head_dim, dtype, isa,
                                                     merge=pages.block_merge(page, block_m))
                        cpu_ops.run(q[start:end], views, sched, scale)
                    else:
                        kernels.sparse_prefill_paged(q[start:end], k_cache, v_cache, block_row, index, scale=scale)
                if device != "cpu":
                    torch.cuda.synchronize()

            out[ci, li] = _best(run_prompt, repeats)
        if log is not None:
            log(f"cost at {n} tokens: dense {out[0, li]:.3f}s per layer; cheapest candidate "
                f"{out[:, li].min() / max(out[0, li], 1e-12):.2f}x of dense ({'vLLM op' if use_op else 'sparse kernel'})")
    return out


def relative(costs: np.ndarray, dense_index: int = 0) -> np.ndarray:
    """Costs as a fraction of the dense candidate's at the same length (``[C, N]``)."""
    return costs / np.maximum(costs[dense_index][None], 1e-12)


def measure_decode_costs(candidates: Sequence, num_heads: int, num_kv_heads: int, head_dim: int,
                         lengths: Sequence[int], *, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                         batch: int = 1, repeats: int = 20, log=None):
    """``DecodeCosts``: seconds of one decode step of one layer (``batch`` requests of each length).

    The decode side's counterpart of ``measure_costs``, timed the way the server runs a decode row:

    * CPU with vLLM's op: a layer whose heads all decode densely is one op call (``plan_batch``'s
      schedule, made once per step by the builder and shared by the layers, so not timed) over a
      cache in the layout such a plan keeps (stock's, 128-token blocks): ``op``. Sink + window heads
      run on the op too (``cpu_ops.plan_decode``: the pages each head's sink and window touch, no
      torch reader, so no layout change: ``op_shared`` = ``op``): ``kernel`` per candidate is that
      call with every head on the candidate, its selection and schedule included (a per-head plan's
      layers seldom share decode specs, so the server plans them per layer); a dense head beside
      window heads reads every page in the same call, so the dense row is ``op``.
    * elsewhere (CUDA, or a CPU without the op): every decode row runs ``kernels.sparse_decode``,
      dense included, so ``op`` and ``op_shared`` are its dense time.

    Random q/k/v: a window's or dense read's time does not depend on the values. Many repeats, the
    best kept: one step of one layer takes well under a millisecond on a CPU.
    """
    import numpy as np

    from headwise import kernels
    from headwise.kernels.index import DecodeMode, DecodeSelection
    from headwise.patterns.decode import build_layer_decode_selection
    from headwise.patterns.profile_decode import DecodeCosts
    from headwise.server.plugin import cpu_ops
    from headwise.server.plugin.kv_cache import split_kv, write_kv
    from headwise.server.plugin.plan_binding import FINE_PAGE, OP_DECODE, VLLM_CPU_BLOCK

    use_op = (device == "cpu" and cpu_ops.available(dtype, head_dim)
              and all(c.type in OP_DECODE for c in candidates))
    gen = torch.Generator().manual_seed(0)
    scale = head_dim ** -0.5
    kv_heads = torch.arange(num_heads) // (num_heads // num_kv_heads)
    op, op_shared = np.zeros(len(lengths)), np.zeros(len(lengths))
    kernel = np.zeros((len(candidates), len(lengths)))

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    for li, n in enumerate(lengths):
        q = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype).to(device)
        k = torch.randn(batch * n, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
        v = torch.randn(batch * n, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
        seq_lens = torch.full((batch,), n, dtype=torch.int32, device=device)

        def cache(page: int, isa: str):
            """``batch`` requests of ``n`` cached tokens each in a paged cache of ``page``-token pages."""
            per = -(-n // page)
            kv = torch.zeros(batch * per, num_kv_heads, page, 2 * head_dim, dtype=dtype, device=device)
            table = torch.arange(batch * per, dtype=torch.int32, device=device).view(batch, per)
            slots = (table.long()[:, :, None] * page + torch.arange(page, device=device)).flatten(1)[:, :n]
            write_kv(k, v, kv, slots.flatten(), isa)
            return kv, table

        if use_op:
            stock = cpu_ops.cache_isa(dtype, VLLM_CPU_BLOCK, head_dim, False)
            kv_op, table_op = cache(VLLM_CPU_BLOCK, stock)
            views = cpu_ops.page_views(kv_op)
            sched = cpu_ops.plan_batch(torch.arange(batch + 1), seq_lens, table_op, num_heads, num_kv_heads,
                                       head_dim, dtype, stock)
            op[li] = op_shared[li] = _best(lambda: cpu_ops.run(q, views, sched, scale), repeats)
            for ci, spec in enumerate(candidates):
                if spec.type == "dense":
                    kernel[ci, li] = op[li]
                    continue

                def op_step() -> None:
                    sel = build_layer_decode_selection([spec] * num_heads, list(range(num_heads)), num_heads, q,
                                                       None, table_op, seq_lens, kv_heads=kv_heads, scale=scale,
                                                       num_layer_kv_heads=num_kv_heads)
                    plan = cpu_ops.plan_decode(sel, seq_lens, table_op, VLLM_CPU_BLOCK, num_heads, num_kv_heads,
                                               head_dim, dtype, stock)
                    cpu_ops.run(q, views, plan, scale)

                kernel[ci, li] = _best(op_step, repeats)
            if log is not None:
                log(f"decode cost at {n} tokens, one layer on vLLM's op: dense {op[li] * 1e3:.3f} ms; "
                    + ", ".join(f"{_label(c)} {t * 1e3:.3f} ms" for c, t in zip(candidates, kernel[:, li])))
            continue
        kv, table = cache(FINE_PAGE, cpu_ops.CACHE_ISA)  # the layout the torch kernel reads
        k_cache, v_cache = split_kv(kv)
        for ci, spec in enumerate(candidates):
            def step() -> None:
                if spec.type == "dense":  # a dense head beside selecting ones: every token, on the kernel
                    sel = DecodeSelection.uniform(batch, num_heads, DecodeMode.DENSE, device=device)
                else:
                    sel = build_layer_decode_selection([spec] * num_heads, list(range(num_heads)), num_heads, q,
                                                       k_cache, table, seq_lens, kv_heads=kv_heads, scale=scale,
                                                       num_layer_kv_heads=num_kv_heads)
                kernels.sparse_decode(q, k_cache, v_cache, table, seq_lens, sel, scale=scale)
                sync()

            kernel[ci, li] = _best(step, repeats)
        dense = [ci for ci, c in enumerate(candidates) if c.type == "dense"]
        op[li] = op_shared[li] = kernel[dense[0], li] if dense else 1.0
        if log is not None:
            log(f"decode cost at {n} tokens, one layer on the sparse decode kernel: "
                + ", ".join(f"{_label(c)} {t * 1e3:.3f} ms" for c, t in zip(candidates, kernel[:, li])))
    return DecodeCosts(op, op_shared, kernel)


def _label(spec) -> str:
    return "dense" if spec.type == "dense" else f"window {spec.window}+{spec.sink}"
