"""Prefill rows on vLLM's CPU attention op (``server/plugin/cpu_ops.py``) against the masked fp32 oracle,
and ``page_index``: the same page-rounded keys as an index (what the transformers integration runs)."""

from __future__ import annotations

import pytest
import torch

from headwise.kernels.index import SparseIndex
from headwise.kernels.reference import masked_attention_reference
from headwise.patterns.a_shape import sink_window_index
from headwise.patterns.prefill import with_dense_tail
from headwise.server.plugin import cpu_ops, pages

HQ, HKV, D = 9, 3, 64
pytestmark = pytest.mark.skipif(not cpu_ops.available(torch.bfloat16, D), reason="vLLM's CPU attention op is not here")


PAGE = 32


def _paged(s: int, tq: int, seed: int, page: int = PAGE):
    """Queries, contiguous K/V and the same K/V in a paged cache under a scattered block row."""
    from headwise.server.plugin.kv_cache import write_kv

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, HQ, D, generator=g).bfloat16()
    k, v = (torch.randn(s, HKV, D, generator=g).bfloat16() for _ in range(2))
    n = -(-s // page)
    blocks = torch.randperm(n + 5, generator=g)[:n]  # scattered: a wrong lookup reads other data
    kv = torch.zeros(n + 5, HKV, page, 2 * D, dtype=torch.bfloat16)
    write_kv(k, v, kv, (blocks.repeat_interleave(page) * page + torch.arange(page).repeat(n))[:s])
    return q, k, v, kv, blocks.to(torch.int32)


def _rounded_mask(index: SparseIndex, page: int) -> torch.Tensor:
    """``[H, Tq, S]``: the keys the op attends when it reads ``page_mask``'s pages (causal)."""
    pm = pages.page_mask(index, page)  # [H, NQB, P]
    qpos = index.q_offset + torch.arange(index.q_len)
    per_query = pm[:, torch.arange(index.q_len) // index.block_m]  # [H, Tq, P]
    keys = per_query[..., torch.arange(index.seq_len) // page]  # [H, Tq, S]
    return keys & (torch.arange(index.seq_len)[None, :] <= qpos[:, None])[None]


def _check(index: SparseIndex, seed: int = 0):
    """The op over the real cache equals the fp32 oracle under the page-rounded mask, and that mask
    keeps every key of the pattern (a superset); returns the schedule."""
    q, k, v, kv, row = _paged(index.seq_len, index.q_len, seed)
    sched = cpu_ops.plan_prefill(index, row, PAGE, HKV, D, torch.bfloat16)
    got = cpu_ops.run(q, kv, sched, D ** -0.5)
    exact, rounded = index.to_dense_mask(), _rounded_mask(index, PAGE)
    assert bool((rounded | ~exact).all()), "page rounding dropped a kept key"
    assert sched.kept_pairs == int(rounded.sum())  # the density the stats report is the rounded one
    # the same keys as an index: what the transformers integration runs to match the engine
    assert torch.equal(pages.page_index(index, PAGE).to_dense_mask(), rounded)
    want, _ = masked_attention_reference(q, k, v, rounded, D ** -0.5)
    # bf16 output: one rounding step of outputs up to ~2 is 7.8e-3 (the largest error measured here)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)
    return sched


@pytest.mark.parametrize("s,q_offset", [(700, 0), (700, 333), (97, 0)])
def test_dense_rows_are_one_request_over_the_real_pages_at_any_offset(s, q_offset):
    index = SparseIndex.dense(HQ, s - q_offset, q_offset)
    sched = _check(index, seed=s + q_offset)
    # every head keeps the same keys: one call over all heads, one request (not one per block)
    assert len(sched.calls) == 1 and sched.calls[0].heads is None and len(sched.calls[0].seq_lens) == 1


def test_sinks_and_page_aligned_windows_per_kv_group():
    # window 513 = the query itself + 512 keys: a block's window starts on a page boundary (exact)
    s = 1100
    sink = torch.tensor([64] * 3 + [32] * 3 + [0] * 3)
    window = torch.tensor([513] * 3 + [257] * 3 + [129] * 3)
    index = sink_window_index(sink, window, s, 0, 64)
    sched = _check(index, seed=1)
    assert sorted(c.kv_head for c in sched.calls) == [0, 1, 2] and all(len(c.heads) == 3 for c in sched.calls)
    assert sched.kept_pairs == int(index.to_dense_mask().sum())  # page-shaped: nothing rounded


def test_a_chunk_after_a_cached_prefix_and_a_dense_tail():
    s, q_offset = 1000, 384
    index = sink_window_index(torch.full((HQ,), 32), torch.full((HQ,), 129), s - q_offset, q_offset, 64)
    tailed = with_dense_tail(index, 100)
    assert int(tailed.range_count[0, -1]) == 1 and int(tailed.range_end[0, -1, 0]) == s  # last blocks dense
    assert torch.equal(tailed.range_count[:, 0], index.range_count[:, 0])  # the rest untouched
    _check(tailed, seed=2)


def test_indices_without_a_page_form_are_rounded_up_to_whole_pages():
    s = 600
    unaligned = sink_window_index(torch.full((HQ,), 64), torch.full((HQ,), 512), s, 0, 64)
    sched = _check(unaligned, seed=3)  # the window starts one past a page boundary
    assert sched.kept_pairs > int(unaligned.to_dense_mask().sum())
    nqb = -(-s // 64)
    ranges = [[[(max(0, b * 64 - 128), min(s, b * 64 + 64))] for b in range(nqb)] for _ in range(HQ)]
    cols = [[[max(0, b * 64 - 200)] if b > 4 else [] for b in range(nqb)] for h in range(HQ)]
    _check(SparseIndex.from_lists(ranges, cols, s), seed=4)  # vertical columns: their pages
    off_page = SparseIndex.from_lists([[[(0, 8), (max(0, b * 64 - 100), min(s, b * 64 + 64))]
                                        for b in range(-(-(s - 16) // 64))] for _ in range(HQ)],
                                      [[[] for _ in range(-(-(s - 16) // 64))] for _ in range(HQ)], s - 16, 16)
    _check(off_page, seed=5)  # the chunk starts off a page boundary


def test_heads_with_different_patterns_run_as_head_sets():
    s = 900
    sink = torch.tensor([64, 64, 0, 32, 32, 32, 0, 0, 64])
    window = torch.tensor([300, 300, 129, 200, 200, 200, 700, 64, 64])
    sched = _check(sink_window_index(sink, window, s, 0, 64), seed=6)
    sets = sorted(c.heads for c in sched.calls)
    assert [0, 1] in sets and [3, 4, 5] in sets and all(c.kv_head == c.heads[0] // 3 for c in sched.calls)


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("HEADWISE_CPU_NATIVE", "0")
    assert not cpu_ops.available(torch.bfloat16, D)


def test_dense_decode_reads_the_real_cache_through_scattered_block_tables():
    from headwise.kernels.decode import sparse_decode_torch
    from headwise.kernels.index import DecodeMode, DecodeSelection
    from headwise.server.plugin.kv_cache import split_kv, write_kv

    bs, nb, lens = 32, 40, [200, 37, 512]
    g = torch.Generator().manual_seed(3)
    kv = torch.zeros(nb, HKV, bs, 2 * D, dtype=torch.bfloat16)
    perm = torch.randperm(nb, generator=g)
    table = torch.zeros(len(lens), 16, dtype=torch.int32)
    start = 0
    for i, n in enumerate(lens):
        blocks = perm[start:start + -(-n // bs)]
        start += len(blocks)
        table[i, :len(blocks)] = blocks.to(torch.int32)
        slots = torch.tensor([int(blocks[p // bs]) * bs + p % bs for p in range(n)])
        write_kv(torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g), kv, slots)
    q = torch.randn(len(lens), HQ, D, generator=g).bfloat16()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    assert cpu_ops.decode_available(kv)
    got = cpu_ops.decode_dense(q, kv, table, seq_lens, D ** -0.5)
    k_cache, v_cache = split_kv(kv)
    want = sparse_decode_torch(q, k_cache, v_cache, table, seq_lens, DecodeSelection.uniform(len(lens), HQ, DecodeMode.DENSE), D ** -0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("per_kv", [False, True], ids=["per query head", "shared per GQA group"])
def test_sink_window_decode_rows_run_on_the_op_over_the_pages_they_keep(per_kv):
    """Decode rows whose heads keep a sink and a window (different per head, some rows dense) run on
    the op over the pages those keep: the fp32 oracle under the page-rounded selection, which keeps
    every key of the exact one; the kept pairs reported are the rounded ones."""
    from headwise.kernels.index import DecodeMode, DecodeSelection
    from headwise.server.plugin.kv_cache import split_kv, write_kv

    bs, nb, lens = PAGE, 60, [700, 37, 512, 130]  # long, shorter than the window, page-aligned, one past a page
    g = torch.Generator().manual_seed(5)
    kv = torch.zeros(nb, HKV, bs, 2 * D, dtype=torch.bfloat16)
    perm = torch.randperm(nb, generator=g)
    table = torch.zeros(len(lens), 24, dtype=torch.int32)
    ks, vs, start = [], [], 0
    for i, n in enumerate(lens):
        blocks = perm[start:start + -(-n // bs)]
        start += len(blocks)
        table[i, :len(blocks)] = blocks.to(torch.int32)
        slots = torch.tensor([int(blocks[p // bs]) * bs + p % bs for p in range(n)])
        ks.append(torch.randn(n, HKV, D, generator=g).bfloat16())
        vs.append(torch.randn(n, HKV, D, generator=g).bfloat16())
        write_kv(ks[-1], vs[-1], kv, slots)
    q = torch.randn(len(lens), HQ, D, generator=g).bfloat16()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    h = HKV if per_kv else HQ
    sink = torch.tensor([[4, 40, 0] * (h // 3)] * len(lens), dtype=torch.int32)  # unaligned sinks, none
    window = torch.tensor([[100, 33, 256] * (h // 3)] * len(lens), dtype=torch.int32)
    mode = torch.full((len(lens), h), int(DecodeMode.WINDOW), dtype=torch.int32)
    mode[2] = int(DecodeMode.DENSE)  # a row below dense_below
    sel = DecodeSelection(mode, sink, window, torch.zeros(len(lens), h, 1, dtype=torch.int32),
                          torch.zeros(len(lens), h, dtype=torch.int32))
    sched = cpu_ops.plan_decode(sel, seq_lens, table, bs, HQ, HKV, D, torch.bfloat16)
    got = cpu_ops.run(q, kv, sched, D ** -0.5)
    rounded = pages.page_round_windows(sel, seq_lens, bs)
    exact_m, round_m = sel.to_dense_mask(seq_lens), rounded.to_dense_mask(seq_lens)  # [B, h, S]
    assert bool((round_m | ~exact_m).all()) and bool((round_m & ~exact_m).any())  # a superset, really rounded
    group = HQ // h
    assert sched.kept_pairs == int(round_m.sum()) * group
    assert sched.causal_pairs == int(seq_lens.sum()) * HQ
    for i, n in enumerate(lens):
        mask = round_m[i].repeat_interleave(group, dim=0)[:, None, :n]  # [HQ, 1, n]
        want, _ = masked_attention_reference(q[i:i + 1], ks[i], vs[i], mask, D ** -0.5)
        torch.testing.assert_close(got[i:i + 1].float(), want, atol=2e-2, rtol=0)
    k_cache, v_cache = split_kv(kv)  # and the torch decode kernel on the rounded selection agrees
    from headwise.kernels.decode import sparse_decode_torch
    same = sparse_decode_torch(q, k_cache, v_cache, table, seq_lens, rounded, D ** -0.5)
    torch.testing.assert_close(got.float(), same.float(), atol=2e-2, rtol=0)


def test_the_default_plan_is_page_shaped_so_nothing_is_rounded():
    from pathlib import Path

    from headwise.patterns.plan import load_plan
    from headwise.patterns.prefill import build_layer_prefill_index

    plan = load_plan(Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m-instruct" / "sparse.json")
    st = plan.settings
    assert plan.expected_density(8192) < 0.12 and plan.expected_density(st.dense_below - 1) == 1.0
    for q_offset, q_len in [(0, 8000), (0, 3500), (4096, 2000), (0, 1000)]:  # whole prompts, a chunk, short
        for layer in (0, 17, 29):
            index = build_layer_prefill_index(plan.layer_prefill(layer), list(range(HQ)), HQ, None, None, None,
                                              q_offset, q_offset + q_len, st.block_size, q_len=q_len,
                                              num_layer_kv_heads=HKV, dense_below=st.dense_below,
                                              dense_tail=st.dense_tail)
            sched = cpu_ops.plan_prefill(index, torch.arange(-(-(q_offset + q_len) // PAGE), dtype=torch.int32),
                                          PAGE, HKV, D, torch.bfloat16)
            assert sched.kept_pairs == int(index.to_dense_mask().sum()), (q_offset, q_len, layer)  # exact
    assert all(spec.type == "dense" for layer in range(30) for spec in plan.layer_decode(layer))


def test_the_cpu_native_benchmark_runs_and_writes_its_figures(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "native.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "cpu_native.py"
    proc = subprocess.run([sys.executable, str(script), "--lengths", "256", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {"cpu", "prefill_isa", "cache_isa", "loadavg_end"} <= set(data["info"])
    got = {(r["kind"], r["pattern"], r["impl"]) for r in data["rows"]}
    assert ("prefill", "dense", "op") in got and ("prefill", "dense", "torch") in got
    assert ("decode", "dense", "op") in got and ("decode", "dense", "torch") in got
    assert all(r["wall_s"] > 0 for r in data["rows"])


def test_blocks_that_share_a_page_run_as_one_virtual_request():
    """With 128-token pages two 64-query blocks live in one page: merged into one virtual request
    (the union of their pages), the op still equals the oracle under the keys it reads, and every
    key of the pattern is among them."""
    page, s, q_offset = 128, 1500, 333
    index = with_dense_tail(sink_window_index(torch.full((HQ,), 64), torch.full((HQ,), 257), s - q_offset, q_offset,
                                              64), 64)
    q, k, v, kv, row = _paged(s, s - q_offset, seed=4, page=page)
    single = cpu_ops.plan_prefill(index, row, page, HKV, D, torch.bfloat16, merge=1)
    merged = cpu_ops.plan_prefill(index, row, page, HKV, D, torch.bfloat16, merge=2)
    assert merged.calls[0].block_table.shape[0] == -(-index.num_q_blocks // 2) < single.calls[0].block_table.shape[0]
    pm, _, _ = pages.merge_blocks(pages.page_mask(index, page), torch.zeros(index.num_q_blocks),
                                    torch.zeros(index.num_q_blocks), 2)  # [H, groups, P]
    qpos = q_offset + torch.arange(index.q_len)
    keys = pm[:, torch.arange(index.q_len) // (2 * index.block_m)][..., torch.arange(s) // page]
    keys &= (torch.arange(s)[None, :] <= qpos[:, None])[None]
    assert bool((keys | ~index.to_dense_mask()).all()) and merged.kept_pairs == int(keys.sum())
    want, _ = masked_attention_reference(q, k, v, keys, D ** -0.5)
    torch.testing.assert_close(cpu_ops.run(q, kv, merged, D ** -0.5).float(), want, atol=2e-2, rtol=0)
