"""Which path each row of a step takes, with the kernels replaced by recording fakes.

No engine: the real builder and impl run over hand-built vLLM metadata (``plugin_batches``). The
fakes record their arguments and delegate to the real torch kernels, so every test also checks
the output against the dense-masked fp32 oracle computed from contiguous K/V. fp32 everywhere:
the torch path and the oracle differ only by summation order, ~1e-6; 1e-4 leaves room for the
online softmax's rescaling.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from headwise import kernels
from headwise.kernels import dispatch
from headwise.kernels.index import DecodeMode
from headwise.patterns import a_shape
from headwise.patterns.base import PrefillInputs
from headwise.patterns.prefill import build_layer_prefill_index
from headwise.server.plugin import cpu_ops, pages
from headwise.server.plugin import impl as impl_mod
from headwise.server.plugin import stats
from plugin_batches import D, HQ, HKV, SCALE, Req, Step, make_backend, make_plan, run_layer
from plugin_batches import fresh_recorder  # noqa: F401  (autouse)

DENSE = {"type": "dense"}
ATOL = 1e-4

# The step vLLM hands over after reordering one-token rows to the front. Why each row is there:
MIXED = [
    Req(context=39, q_len=1, prefilling=False),  # a running decode
    Req(context=69, q_len=1, prefilling=False),  # another decode, different length
    Req(context=0, q_len=1, prefilling=True),  # a one-token *prompt*: batched with decodes, is a prefill
    Req(context=50, q_len=1, prefilling=True),  # prefix-cache hit, only the last prompt token left: a prefill
    Req(context=64, q_len=40, prefilling=True),  # a later chunk of a chunked prefill (reads 64 cached tokens)
    Req(context=0, q_len=100, prefilling=True),  # a fresh prompt, not a multiple of the 64-query block
]


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def kinds(self) -> list[str]:
        return [k for k, _ in self.calls]


@pytest.fixture
def fakes(monkeypatch):
    rec = Recorder()

    def prefill(q, k_cache, v_cache, table_row, index, scale=None):
        rec.calls.append(("prefill", dict(q=q.clone(), table_row=table_row.clone(), index=index)))
        return kernels.sparse_prefill_paged_torch(q, k_cache, v_cache, table_row, index, scale)

    def decode(q, k_cache, v_cache, block_table, seq_lens, selection, scale=None):
        rec.calls.append(("decode", dict(q=q.clone(), seq_lens=seq_lens.clone(), table=block_table.clone(),
                                         selection=selection)))
        return kernels.sparse_decode_torch(q, k_cache, v_cache, block_table, seq_lens, selection, scale)

    monkeypatch.setitem(impl_mod.KERNELS, "sparse_prefill_paged", prefill)
    monkeypatch.setitem(impl_mod.KERNELS, "sparse_decode", decode)
    monkeypatch.setitem(impl_mod.KERNELS, "native_batch", None)  # vLLM's CPU op: its own tests below
    return rec


def test_mixed_batch_routes_each_row(tmp_path, fakes):
    builder, impls = make_backend(make_plan(DENSE, DENSE), tmp_path)
    step = Step(MIXED)
    md = builder.build(0, step.common)
    query = step.query(1)
    out = run_layer(impls[0], 0, step, md, query)

    assert fakes.kinds() == ["decode", "prefill", "prefill", "prefill", "prefill"]
    _, dec = fakes.calls[0]
    assert dec["seq_lens"].tolist() == [40, 70]
    assert torch.equal(dec["q"], query[0:2])
    assert torch.equal(dec["table"], step.block_table[:2])
    # prefills: (request, chunk start, chunk length) in batch order, one call each
    for (_, call), i in zip(fakes.calls[1:], [2, 3, 4, 5]):
        r = MIXED[i]
        assert (call["index"].q_offset, call["index"].q_len) == (r.context, r.q_len)
        assert torch.equal(call["q"], query[step.rows(i)])
        assert torch.equal(call["table_row"], step.block_table[i])
    for i in range(len(MIXED)):
        torch.testing.assert_close(out[step.rows(i)], step.reference(query, i, step.causal(i)), atol=ATOL, rtol=0)


@pytest.mark.skipif(not cpu_ops.available(torch.float32, D), reason="vLLM's CPU attention op is not here")
def test_every_prefill_row_runs_on_vllms_cpu_op_over_the_real_cache(tmp_path, fakes, monkeypatch):
    """With 32-token cache pages the op reads the cache: dense rows as one request, page-shaped
    windows exactly, a chunk off the page grid rounded up to whole pages (a superset). The torch
    prefill kernel never runs; outputs match the oracle under the page-rounded mask."""
    import plugin_batches

    monkeypatch.setattr(plugin_batches, "BS", 32)
    native = []

    def run_native(q, kv_cache, schedule, scale, out=None):
        native.append((q.shape[0], schedule))
        return cpu_ops.run(q, kv_cache, schedule, scale, out)

    monkeypatch.setitem(impl_mod.KERNELS, "native_batch", run_native)
    # window 33 = the query + one 32-token page: page-shaped for chunks starting on a page boundary
    plan = make_plan({"type": "a_shape", "sink": 32, "window": 33}, DENSE, dense_below=64)
    builder, impls = make_backend(plan, tmp_path)
    reqs = [Req(0, 40, True), Req(0, 200, True), Req(64, 100, True), Req(50, 80, True)]
    step = Step(reqs, seed=5)
    md = builder.build(0, step.common)
    query = step.query(6)
    out = run_layer(impls[1], 1, step, md, query)
    assert [n for n, _ in native] == [40, 200, 100, 80] and not fakes.calls
    for i in range(len(reqs)):
        index = build_layer_prefill_index(plan.layer_prefill(1), list(range(HQ)), HQ, None, None, None,
                                          reqs[i].context, reqs[i].context + reqs[i].q_len, q_len=reqs[i].q_len,
                                          num_layer_kv_heads=HKV, dense_below=64)
        pm = pages.page_mask(index, 32)[:, torch.arange(index.q_len) // 64]  # [H, Tq, P]
        rounded = pm[..., torch.arange(index.seq_len) // 32] & step.causal(i)
        assert bool((rounded | ~index.to_dense_mask()).all())  # a superset of the pattern
        assert native[i][1].kept_pairs == int(rounded.sum())
        if i < 3:  # on the page grid: nothing rounded
            assert torch.equal(rounded, index.to_dense_mask())
        torch.testing.assert_close(out[step.rows(i)], step.reference(query, i, rounded), atol=ATOL, rtol=0)


@pytest.mark.skipif(not cpu_ops.available(torch.float32, D), reason="vLLM's CPU attention op is not here")
def test_a_step_whose_rows_are_all_dense_is_one_op_call_as_stock_makes_it(tmp_path, fakes, monkeypatch):
    import plugin_batches

    monkeypatch.setattr(plugin_batches, "BS", 32)
    native = []

    def run_native(q, kv_cache, schedule, scale, out=None):
        native.append(q.shape[0])
        return cpu_ops.run(q, kv_cache, schedule, scale, out)

    monkeypatch.setitem(impl_mod.KERNELS, "native_batch", run_native)
    # sparse patterns, but every row is below dense_below: the whole batch is one dense call
    plan = make_plan({"type": "a_shape", "sink": 32, "window": 33}, {"type": "window", "sink": 4, "window": 16},
                     dense_below=4096)
    builder, impls = make_backend(plan, tmp_path)
    step = Step(MIXED, seed=8)
    md = builder.build(0, step.common)
    query = step.query(9)
    out = run_layer(impls[0], 0, step, md, query)
    assert native == [step.num_tokens] and not fakes.calls
    for i in range(len(MIXED)):
        torch.testing.assert_close(out[step.rows(i)], step.reference(query, i, step.causal(i)), atol=ATOL, rtol=0)


@pytest.mark.skipif(not cpu_ops.available(torch.float32, D), reason="vLLM's CPU attention op is not here")
def test_sink_window_decode_runs_on_vllms_op_planned_once_per_step(tmp_path, fakes, monkeypatch):
    """Window decode heads read the pages their sink and window keep, on the op (no torch decode
    kernel), rounded up to whole pages; layers with the same decode specs share one schedule."""
    import plugin_batches

    monkeypatch.setattr(plugin_batches, "BS", 32)
    native = []

    def run_native(q, kv_cache, schedule, scale, out=None):
        native.append(schedule)
        return cpu_ops.run(q, kv_cache, schedule, scale, out)

    monkeypatch.setitem(impl_mod.KERNELS, "native_batch", run_native)
    plan = make_plan({"type": "a_shape", "sink": 32, "window": 33}, {"type": "window", "sink": 4, "window": 40},
                     dense_below=64)
    builder, impls = make_backend(plan, tmp_path)
    reqs = [Req(39, 1, False), Req(150, 1, False), Req(200, 1, False)]  # below dense_below, then windows
    step = Step(reqs, seed=12)
    md = builder.build(0, step.common)
    outs = [run_layer(impls[layer], layer, step, md, step.query(13 + layer), write=layer == 0) for layer in (0, 1)]
    assert not fakes.calls and len(native) == 2 and native[0] is native[1]  # planned once, shared
    sel = make_window_selection(reqs, 4, 40, dense_below=64)
    rounded = pages.page_round_windows(sel, step.seq_lens, 32).to_dense_mask(step.seq_lens)
    assert native[0].kept_pairs == int(rounded.sum()) * (HQ // HKV)
    for layer, out in zip((0, 1), outs):
        for i, r in enumerate(reqs):
            mask = rounded[i].repeat_interleave(HQ // HKV, dim=0)[:, None, :r.seq_len]
            torch.testing.assert_close(out[step.rows(i)], step.reference(step.query(13 + layer), i, mask),
                                       atol=ATOL, rtol=0)


def make_window_selection(reqs, sink: int, window: int, dense_below: int):
    """The selection a sink + window decode spec makes, shared per GQA group (``[B, HKV]``)."""
    from headwise.kernels.index import DecodeSelection

    b = len(reqs)
    sel = DecodeSelection.uniform(b, HKV, DecodeMode.WINDOW, sink=sink, window=window)
    short = torch.tensor([r.seq_len < dense_below for r in reqs]).view(-1, 1)
    sel.mode = torch.where(short, torch.full_like(sel.mode, int(DecodeMode.DENSE)), sel.mode)
    return sel


def test_without_vllms_prefill_flag_an_empty_context_still_marks_a_prompt(tmp_path, fakes):
    builder, impls = make_backend(make_plan(DENSE, DENSE), tmp_path)
    step = Step(MIXED, flag_prefilling=False)
    md = builder.build(0, step.common)
    run_layer(impls[0], 0, step, md, step.query(2))
    # the prefix-cache hit (context 50, one token) is indistinguishable from a decode then
    assert fakes.calls[0][1]["seq_lens"].tolist() == [40, 70, 51]
    assert [c["index"].q_offset for k, c in fakes.calls if k == "prefill"] == [0, 64, 0]


def test_sparse_rows_and_dense_fallback(tmp_path, fakes):
    plan = make_plan({"type": "a_shape", "sink": 8, "window": 32}, {"type": "window", "sink": 4, "window": 16},
                     dense_below=64)
    builder, impls = make_backend(plan, tmp_path)
    reqs = [Req(30, 1, False), Req(149, 1, False), Req(0, 40, True), Req(0, 200, True)]
    step = Step(reqs, seed=3)
    md = builder.build(0, step.common)
    query = step.query(4)
    out = run_layer(impls[1], 1, step, md, query)

    sel = fakes.calls[0][1]["selection"]
    # one window spec for all heads: a GQA group shares one selection row (KV-head axis)
    assert sel.num_heads == HKV
    assert sel.mode[0].tolist() == [DecodeMode.DENSE] * HKV  # 31 tokens < dense_below
    assert sel.mode[1].tolist() == [DecodeMode.WINDOW] * HKV
    short, long = fakes.calls[1][1]["index"], fakes.calls[2][1]["index"]
    assert torch.equal(short.to_dense_mask(), step.causal(2))  # 40 < dense_below: dense
    want = a_shape.build_prefill(a_shape.AShape(sink=8, window=32),
                                 PrefillInputs(heads=list(range(HQ)), num_layer_heads=HQ, q_offset=0, q_len=200,
                                               total_len=200))
    assert torch.equal(long.to_dense_mask(), want.to_dense_mask()) and long.density() < 0.6
    dec_mask = sel.to_dense_mask(step.seq_lens[:2]).repeat_interleave(HQ // HKV, dim=1)
    for i, mask in [(0, dec_mask[0, :, None, :31]), (1, dec_mask[1, :, None, :150]),
                    (2, short.to_dense_mask()), (3, long.to_dense_mask())]:
        torch.testing.assert_close(out[step.rows(i)], step.reference(query, i, mask), atol=ATOL, rtol=0)
    stats.get_recorder().publish()
    st = stats.read_stats(tmp_path)
    assert st["requests"] == {"prefill": {"sparse": 1, "dense_fallback": 1},
                              "decode": {"sparse": 1, "dense_fallback": 1}}
    assert 0 < st["layers"][1]["density"]["prefill"] < 1 and st["attention_calls"] == 1


def test_static_index_built_once_per_step_and_shared_by_layers(tmp_path, fakes, monkeypatch):
    from headwise.patterns import prefill as prefill_mod

    builds = 0
    real = prefill_mod.build_prefill

    def counting(spec, inputs):
        nonlocal builds
        builds += 1
        return real(spec, inputs)

    monkeypatch.setattr(prefill_mod, "build_prefill", counting)
    plan = make_plan({"type": "a_shape", "sink": 8, "window": 32}, DENSE,
                     layers={"2": {"prefill": {"type": "a_shape", "sink": 16, "window": 32}}})
    builder, impls = make_backend(plan, tmp_path)
    step = Step([Req(0, 150, True)], seed=5)
    md = builder.build(0, step.common)
    for layer in range(4):
        run_layer(impls[layer], layer, step, md, step.query(10 + layer), write=layer == 0)
    ids = [id(c["index"]) for _, c in fakes.calls]
    assert ids[0] == ids[1] == ids[3] != ids[2]  # layer 2 has its own spec
    assert builds == 2  # one index per (signature, row) for the whole step, not one per layer
    md2 = builder.build(0, step.common)  # next step: a fresh cache
    run_layer(impls[0], 0, step, md2, step.query(20), write=False)
    assert id(fakes.calls[-1][1]["index"]) != ids[0]


def test_tidal_select_layer_writes_what_reuse_layers_read(tmp_path, fakes):
    plan = make_plan(DENSE, {"type": "tidal", "role": "reuse"}, num_layers=4, tidal_top_k=8,
                     layers={"0": {"decode": DENSE}, "1": {"decode": {"type": "tidal", "role": "select"}}})
    builder, impls = make_backend(plan, tmp_path)
    step = Step([Req(39, 1, False), Req(74, 1, False), Req(129, 1, False)], seed=7)
    md = builder.build(0, step.common)
    q_sel, q_reuse = step.query(30), step.query(31)
    run_layer(impls[1], 1, step, md, q_sel)

    # the buffer holds each head's top-8 positions by q.k (current token forced in), computed here
    # independently from the contiguous keys
    positions, counts = md.tidal.read(3, torch.arange(HQ))
    for i, r in enumerate(step.reqs):
        k = step.k[i][:, torch.arange(HQ) // (HQ // HKV)]  # [S, HQ, D]
        scores = torch.einsum("hd,shd->hs", q_sel[i], k) * SCALE
        scores[:, r.seq_len - 1] = float("inf")
        want = torch.sort(torch.topk(scores, 8, dim=-1).indices, dim=-1).values
        assert counts[i].tolist() == [8] * HQ
        assert torch.equal(positions[i].long(), want)

    out = run_layer(impls[2], 2, step, md, q_reuse, write=False)
    sel = fakes.calls[-1][1]["selection"]
    assert (sel.mode == DecodeMode.POSITIONS).all()
    assert torch.equal(sel.indices, positions) and torch.equal(sel.count, counts)
    mask = sel.to_dense_mask(step.seq_lens)
    for i, r in enumerate(step.reqs):
        assert mask[i].sum(-1).tolist() == [8] * HQ
        torch.testing.assert_close(out[step.rows(i)], step.reference(q_reuse, i, mask[i, :, None, :r.seq_len]),
                                   atol=ATOL, rtol=0)

    # next step: the select layer overwrites the same (persistent) buffer, reuse layers follow
    address = md.tidal.positions.data_ptr()
    md2 = builder.build(0, step.common)
    run_layer(impls[1], 1, step, md2, step.query(40), write=False)
    run_layer(impls[3], 3, step, md2, q_reuse, write=False)
    assert md2.tidal.positions.data_ptr() == address
    assert not torch.equal(fakes.calls[-1][1]["selection"].indices, positions)
    assert torch.equal(fakes.calls[-1][1]["selection"].indices, md2.tidal.read(3, torch.arange(HQ))[0])


def test_simulated_cuda_dispatch_routes_to_triton_entry_points(tmp_path, monkeypatch):
    """With a CUDA-like dispatch, the impl's calls reach the Triton launchers, never the torch path."""
    calls: list[str] = []

    def triton_prefill(q, k_cache, v_cache, table_row, index, scale, return_lse):
        calls.append(f"triton_prefill q_offset={index.q_offset}")
        return kernels.sparse_prefill_paged_torch(q, k_cache, v_cache, table_row, index, scale, return_lse)

    def triton_decode(q, k_cache, v_cache, table, seq_lens, selection, scale, return_lse):
        calls.append(f"triton_decode batch={q.shape[0]}")
        return kernels.sparse_decode_torch(q, k_cache, v_cache, table, seq_lens, selection, scale, return_lse)

    def refuse(*args, **kwargs):
        raise AssertionError("the torch path ran although dispatch chose Triton")

    monkeypatch.setitem(sys.modules, "headwise.kernels.prefill_triton",
                        types.SimpleNamespace(sparse_prefill_paged_triton=triton_prefill))
    monkeypatch.setitem(sys.modules, "headwise.kernels.decode_triton",
                        types.SimpleNamespace(sparse_decode_triton=triton_decode))
    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)
    monkeypatch.setitem(impl_mod.KERNELS, "native_batch", None)  # a CUDA build has no vLLM CPU op
    monkeypatch.setattr(dispatch, "sparse_prefill_paged_torch", refuse)
    monkeypatch.setattr(dispatch, "sparse_decode_torch", refuse)

    builder, impls = make_backend(make_plan(DENSE, DENSE), tmp_path)
    step = Step(MIXED, seed=9)
    md = builder.build(0, step.common)
    query = step.query(11)
    out = run_layer(impls[0], 0, step, md, query)
    assert calls == ["triton_decode batch=2", "triton_prefill q_offset=0", "triton_prefill q_offset=50",
                     "triton_prefill q_offset=64", "triton_prefill q_offset=0"]
    for i in range(len(MIXED)):
        torch.testing.assert_close(out[step.rows(i)], step.reference(query, i, step.causal(i)), atol=ATOL, rtol=0)


def test_profiling_run_without_metadata_touches_nothing(tmp_path, fakes):
    _, impls = make_backend(make_plan(DENSE, DENSE), tmp_path)
    step = Step([Req(0, 5, True)])
    out = torch.zeros(step.num_tokens, HQ, D)
    impls[0].forward(None, step.query(0), step.key, step.value, step.kv_cache, None, out)
    assert fakes.calls == [] and out.abs().sum() == 0


def test_per_layer_indices_of_different_prompts_never_mix(tmp_path, monkeypatch):
    """Six prompts of different lengths in one step, a dynamic pattern (built per layer and row):
    each row gets an index of its own shape, every layer, and the stats count each row's own
    pairs. The fake keeps no reference to the index (as in the engine, where a freed index's id
    can come back for the next one): it records what the index means, not the object."""
    seen = []

    def prefill(q, k_cache, v_cache, table_row, index, scale=None):
        seen.append(((index.q_len, index.q_offset), index.to_dense_mask()))
        return kernels.sparse_prefill_paged_torch(q, k_cache, v_cache, table_row, index, scale)

    monkeypatch.setitem(impl_mod.KERNELS, "sparse_prefill_paged", prefill)
    plan = make_plan({"type": "vertical_slash", "vertical": 16, "slash": 8, "local_diagonals": 4,
                      "sink_columns": 4, "last_q": 16}, DENSE)
    builder, impls = make_backend(plan, tmp_path)
    step = Step([Req(0, n, True) for n in (230, 201, 150, 199, 260, 120)], seed=13)
    md = builder.build(0, step.common)
    for layer in range(3):
        query = step.query(50 + layer)
        out = run_layer(impls[layer], layer, step, md, query, write=layer == 0)
        masks = seen[-len(step.reqs):]
        for i, (shape, mask) in enumerate(masks):
            assert shape == (step.reqs[i].q_len, 0)
            assert mask.sum() < step.causal(i).sum()
            torch.testing.assert_close(out[step.rows(i)], step.reference(query, i, mask), atol=ATOL, rtol=0)
        rec = stats.get_recorder()
        assert rec.kept[layer][0] == sum(int(m.sum()) for _, m in masks)
        assert rec.causal[layer][0] == sum(int(step.causal(i).sum()) for i in range(len(step.reqs)))


@pytest.mark.skipif(not cpu_ops.available(torch.float32, D), reason="vLLM's CPU attention op is not here")
def test_dense_and_page_shaped_rows_copy_nothing_out_of_the_cache(tmp_path, fakes, monkeypatch):
    """Dense rows, dense layers and static sparse rows read the paged cache in place: the impl never
    gathers a request's K/V (``read_kv``), and no torch kernel runs."""
    import plugin_batches

    monkeypatch.setattr(plugin_batches, "BS", 32)

    def no_copy(*args, **kwargs):
        raise AssertionError("a full-sequence K/V copy was made")

    monkeypatch.setattr(impl_mod, "read_kv", no_copy)
    monkeypatch.setitem(impl_mod.KERNELS, "native_batch", cpu_ops.run)
    plan = make_plan({"type": "a_shape", "sink": 32, "window": 100}, DENSE, dense_below=64,
                     layers={"0": {"prefill": DENSE}})
    builder, impls = make_backend(plan, tmp_path)
    step = Step(MIXED + [Req(0, 300, True)], seed=12)
    md = builder.build(0, step.common)
    for layer in (0, 1):  # a dense layer, then a sparse one whose long row is rounded to pages
        run_layer(impls[layer], layer, step, md, step.query(layer), write=layer == 0)
    assert not fakes.calls
