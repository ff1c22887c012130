"""The CUDA step plan, run on CPU tensors with recording stand-ins for the GPU kernels.

On CUDA the builder plans one launch per layer (``cuda_step.BatchedWork``): FlashAttention for the
rows a layer attends densely, one varlen launch of the sparse kernel for every sparse prefill row,
FlashAttention for the heads of whole dense GQA groups, then the decode rows. Here the builder and
impl run with ``batched=True`` on CPU; ``flash`` is a torch stand-in with FlashAttention's contract
(varlen, paged, causal aligned bottom-right, rows with no keys written as zeros), and the sparse
kernels are headwise's torch implementations of the Triton launchers' contract. Every output is
checked against the dense-masked fp32 oracle from contiguous K/V (``plugin_batches``), so a row
that reached the wrong kernel, or a kernel that ran in the wrong order, shows up as a wrong output.
"""

from __future__ import annotations

import pytest
import torch

from headwise import kernels
from headwise.kernels import estimate
from headwise.kernels.reference import masked_attention_reference
from headwise.patterns.prefill import build_layer_prefill_index
from headwise.server.plugin import cuda_ops
from headwise.server.plugin import impl as impl_mod
from headwise.server.plugin.kv_cache import split_kv
from headwise.server.plugin.metadata import HeadwiseMetadataBuilder
from headwise.server.plugin.plan_binding import PlanBinding
from vllm.v1.attention.backend import AttentionCGSupport
from host_sync import NoHostSync
from plugin_batches import HKV, HQ, Req, Step, make_backend, make_plan, run_layer
from plugin_batches import fresh_recorder  # noqa: F401  (autouse)

DENSE = {"type": "dense"}
A_SHAPE = {"type": "a_shape", "sink": 8, "window": 32}
ATOL = 1e-4  # fp32: torch kernels vs the oracle differ by summation order only
GROUP = HQ // HKV

# Why each row is in the step (vLLM puts one-token rows first):
STEP = [
    Req(context=39, q_len=1, prefilling=False),  # a decode below dense_below
    Req(context=99, q_len=1, prefilling=False),  # a decode above it
    Req(context=0, q_len=30, prefilling=True),  # a prompt below dense_below: a dense row
    Req(context=64, q_len=40, prefilling=True),  # a later chunk of a chunked prefill, sparse
    Req(context=0, q_len=100, prefilling=True),  # a fresh sparse prompt, ragged last block
]
DENSE_BELOW = 64


class Calls:
    def __init__(self):
        self.log: list[tuple[str, dict]] = []

    def kinds(self) -> list[str]:
        return [k for k, _ in self.log]


def flash_standin(q, kv_cache, call, scale, out, heads=slice(None), kv_heads=slice(None)):
    """FlashAttention's contract in torch: per row b, queries ``cu_seqlens_q[b]:[b+1]`` attend the
    first ``seqused_k[b]`` keys of its block-table row, causally aligned to the last key; a row with
    no keys gets zeros."""
    k_cache, v_cache = split_kv(kv_cache)
    qs, used = call.cu_seqlens_q.tolist(), call.seqused_k.tolist()
    hq = q[:, heads].shape[1]
    group = hq // k_cache[:, kv_heads].shape[1]
    for b, n_keys in enumerate(used):
        rows = slice(call.rows.start + qs[b], call.rows.start + qs[b + 1])
        n_q = qs[b + 1] - qs[b]
        if n_keys == 0:
            out[rows, heads] = 0
            continue
        pos = torch.arange(n_keys)
        blocks = call.block_table[b].long()[pos // k_cache.shape[2]]
        k = k_cache[blocks, :, pos % k_cache.shape[2]][:, kv_heads]  # [S, Hkv', D]
        v = v_cache[blocks, :, pos % v_cache.shape[2]][:, kv_heads]
        q_pos = n_keys - n_q + torch.arange(n_q)
        mask = (pos[None, :] <= q_pos[:, None]).expand(hq, -1, -1)
        o, _ = masked_attention_reference(q[rows, heads], k, v, mask, scale)
        out[rows, heads] = o.to(out.dtype)
    assert group >= 1


@pytest.fixture
def gpu(monkeypatch):
    """FlashAttention available for the fp32 test cache; every kernel call recorded."""
    calls = Calls()

    def flash(q, kv_cache, call, scale, out, heads=slice(None), kv_heads=slice(None)):
        calls.log.append(("flash", dict(live=[int(x) > 0 for x in call.seqused_k], heads=heads, call=call)))
        flash_standin(q, kv_cache, call, scale, out, heads, kv_heads)

    def varlen(q, k_cache, v_cache, block_table, index, scale=None, out=None):
        calls.log.append(("varlen", dict(index=index)))
        return kernels.sparse_prefill_varlen_paged_torch(q, k_cache, v_cache, block_table, index, scale, out=out)

    def decode(q, k_cache, v_cache, block_table, seq_lens, selection, scale=None):
        calls.log.append(("decode", dict(selection=selection, seq_lens=seq_lens.clone())))
        return kernels.sparse_decode_torch(q, k_cache, v_cache, block_table, seq_lens, selection, scale)

    def per_row(*args, **kwargs):
        raise AssertionError("a per-row prefill launch on the CUDA path")

    monkeypatch.setattr(cuda_ops, "available", lambda dtype, head_dim: True)
    monkeypatch.setitem(impl_mod.KERNELS, "flash", flash)
    monkeypatch.setitem(impl_mod.KERNELS, "sparse_prefill_varlen_paged", varlen)
    monkeypatch.setitem(impl_mod.KERNELS, "sparse_decode", decode)
    monkeypatch.setitem(impl_mod.KERNELS, "sparse_prefill_paged", per_row)
    monkeypatch.setitem(impl_mod.KERNELS, "native_batch", None)  # a CUDA build has no vLLM CPU op
    return calls


def _prefill_mask(plan, layer: int, req: Req) -> torch.Tensor:
    index = build_layer_prefill_index(plan.layer_prefill(layer), list(range(HQ)), HQ, None, None, None, req.context,
                                      req.seq_len, q_len=req.q_len, num_layer_kv_heads=HKV, dense_below=DENSE_BELOW)
    return index.to_dense_mask()


def _decode_window_mask(step: Step, i: int, sink: int, window: int) -> torch.Tensor:
    n = step.reqs[i].seq_len
    pos = torch.arange(n)
    keep = (pos < sink) | (pos >= n - window) if n >= DENSE_BELOW else torch.ones(n, dtype=torch.bool)
    return keep.view(1, 1, n).expand(HQ, 1, n)


def test_each_layer_is_one_sparse_launch_and_one_flash_call(tmp_path, gpu):
    plan = make_plan(A_SHAPE, DENSE, dense_below=DENSE_BELOW)
    builder, impls = make_backend(plan, tmp_path, batched=True)
    step = Step(STEP, seed=1)
    md = builder.build(0, step.common)
    outs = [run_layer(impls[layer], layer, step, md, step.query(2 + layer), write=layer == 0) for layer in (0, 1)]

    assert gpu.kinds() == ["flash", "varlen"] * 2  # per layer: no per-row launch, no decode kernel
    flash, varlen = gpu.log[0][1], gpu.log[1][1]
    # dense decode layer: both decodes; the 30-token prompt is below dense_below; the sparse rows are not
    assert flash["live"] == [True, True, True, False, False]
    index = varlen["index"]
    assert index.layout.q_starts == (int(step.qsl[3]), int(step.qsl[4])) and index.layout.reqs == (3, 4)
    assert gpu.log[3][1]["index"] is index  # the static index: built once per step for both layers
    for i in range(len(STEP)):
        want = step.causal(i) if i < 3 else _prefill_mask(plan, 0, STEP[i])
        for layer, out in zip((0, 1), outs):
            torch.testing.assert_close(out[step.rows(i)], step.reference(step.query(2 + layer), i, want),
                                       atol=ATOL, rtol=0)


def test_a_dense_layer_makes_stocks_one_call_on_vllms_own_buffers(tmp_path, gpu):
    builder, impls = make_backend(make_plan(DENSE, DENSE, dense_below=DENSE_BELOW), tmp_path, batched=True)
    step = Step(STEP, seed=3)
    md = builder.build(0, step.common)
    query = step.query(4)
    out = run_layer(impls[0], 0, step, md, query)
    assert gpu.kinds() == ["flash"]
    call = gpu.log[0][1]["call"]
    assert all(gpu.log[0][1]["live"])
    # every row live: vLLM's own tensors, not copies (what a captured graph must read)
    assert call.seqused_k.data_ptr() == step.common.seq_lens.data_ptr()
    assert call.cu_seqlens_q.data_ptr() == step.common.query_start_loc.data_ptr()
    for i in range(len(STEP)):
        torch.testing.assert_close(out[step.rows(i)], step.reference(query, i, step.causal(i)), atol=ATOL, rtol=0)


def test_whole_dense_kv_groups_of_a_sparse_layer_run_on_flash(tmp_path, gpu):
    """KV group 0 (heads 0-2) dense, group 1 A-shape: the sparse launch skips group 0's heads and
    FlashAttention computes them for every prefill row, after the sparse kernel."""
    heads = [DENSE] * GROUP + [A_SHAPE] * GROUP
    plan = make_plan(A_SHAPE, {"type": "window", "sink": 4, "window": 16}, dense_below=DENSE_BELOW,
                     layers={"0": {"heads": [{"prefill": h} for h in heads]}})
    builder, impls = make_backend(plan, tmp_path, batched=True)
    step = Step(STEP, seed=5)
    md = builder.build(0, step.common)
    query = step.query(6)
    out = run_layer(impls[0], 0, step, md, query)

    assert gpu.kinds() == ["flash", "varlen", "flash", "decode"]
    assert gpu.log[0][1]["live"] == [False, False, True, False, False]  # the dense prompt row only
    index = gpu.log[1][1]["index"]
    assert int(index.range_count[:GROUP].sum()) == 0 and int(index.range_count[GROUP:].sum()) > 0
    assert gpu.log[2][1]["heads"] == slice(0, GROUP) and gpu.log[2][1]["live"] == [False, False, True, True, True]
    for i in range(len(STEP)):
        if i < 2:
            want = _decode_window_mask(step, i, 4, 16)
        elif i == 2:
            want = step.causal(i)
        else:
            want = torch.cat([step.causal(i)[:GROUP], _prefill_mask(plan, 1, STEP[i])[GROUP:]])
        torch.testing.assert_close(out[step.rows(i)], step.reference(query, i, want), atol=ATOL, rtol=0)


def test_an_estimated_layer_packs_its_rows_into_one_launch(tmp_path, gpu):
    plan = make_plan({"type": "block_sparse", "top_k": 1}, DENSE, dense_below=DENSE_BELOW)
    builder, impls = make_backend(plan, tmp_path, batched=True)
    reqs = [Req(39, 1, False), Req(0, 30, True), Req(192, 40, True), Req(0, 300, True)]
    step = Step(reqs, seed=7)
    md = builder.build(0, step.common)
    query = step.query(8)
    out = run_layer(impls[0], 0, step, md, query)
    assert gpu.kinds() == ["flash", "varlen"]
    index = gpu.log[1][1]["index"]
    assert [p.q_offset for p in index.parts] == [192, 0]
    assert index.layout.q_starts == (int(step.qsl[2]), int(step.qsl[3]))
    for i, part in zip((2, 3), index.parts):
        mask = part.to_dense_mask()
        assert mask.sum() < step.causal(i).sum()  # really sparse: estimated from this layer's q and k
        torch.testing.assert_close(out[step.rows(i)], step.reference(query, i, mask), atol=ATOL, rtol=0)
    for i in range(2):
        torch.testing.assert_close(out[step.rows(i)], step.reference(query, i, step.causal(i)), atol=ATOL, rtol=0)


def test_without_flash_attention_dense_rows_join_the_sparse_launch(tmp_path, gpu, monkeypatch):
    """fp32 caches (FlashAttention runs fp16/bf16 only): dense rows and dense decode go to headwise's kernels."""
    monkeypatch.setattr(cuda_ops, "available", lambda dtype, head_dim: False)
    plan = make_plan(A_SHAPE, DENSE, dense_below=DENSE_BELOW)
    builder, impls = make_backend(plan, tmp_path, batched=True)
    step = Step(STEP, seed=9)
    md = builder.build(0, step.common)
    query = step.query(10)
    out = run_layer(impls[0], 0, step, md, query)
    assert gpu.kinds() == ["varlen", "decode"]
    assert gpu.log[0][1]["index"].layout.reqs == (2, 3, 4)
    for i in range(len(STEP)):
        want = step.causal(i) if i < 3 else _prefill_mask(plan, 0, STEP[i])
        torch.testing.assert_close(out[step.rows(i)], step.reference(query, i, want), atol=ATOL, rtol=0)


@pytest.mark.parametrize("prefill,decode", [
    (A_SHAPE, DENSE),  # static prefill, FlashAttention decode
    ({"type": "block_sparse", "top_k": 2}, {"type": "window", "sink": 4, "window": 16}),  # estimated + selected
])
def test_the_per_layer_path_reads_nothing_back_to_the_host(tmp_path, monkeypatch, prefill, decode):
    """K/V write, index estimation, packing, launches, decode selection and stats of one layer, with
    kernels that only record (their CPU stand-ins read values back; the Triton launchers do not)."""
    monkeypatch.setattr(estimate, "FORCE_FIXED_SHAPES", True)  # the CUDA branch's fixed shapes
    monkeypatch.setattr(cuda_ops, "available", lambda dtype, head_dim: True)
    seen = []
    monkeypatch.setitem(impl_mod.KERNELS, "flash", lambda *a, **k: seen.append("flash"))
    monkeypatch.setitem(impl_mod.KERNELS, "sparse_prefill_varlen_paged", lambda *a, **k: seen.append("varlen"))
    monkeypatch.setitem(impl_mod.KERNELS, "sparse_decode", lambda q, *a, **k: seen.append("decode") or torch.zeros_like(q))
    monkeypatch.setitem(impl_mod.KERNELS, "native_batch", None)
    builder, impls = make_backend(make_plan(prefill, decode, dense_below=DENSE_BELOW), tmp_path, batched=True)
    step = Step(STEP, seed=11)
    md = builder.build(0, step.common)
    with NoHostSync():
        run_layer(impls[0], 0, step, md, step.query(12))
    assert "varlen" in seen and "flash" in seen and ("decode" in seen) == (decode != DENSE)


def test_decode_is_declared_capturable_where_it_is_one_flash_call(tmp_path):
    support = HeadwiseMetadataBuilder.cudagraph_support_for
    dense = PlanBinding(make_plan(A_SHAPE, DENSE))
    window = PlanBinding(make_plan(A_SHAPE, {"type": "window", "sink": 4, "window": 16}))
    assert support(dense, torch.bfloat16, 64) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    assert support(dense, torch.float32, 64) == AttentionCGSupport.NEVER  # no FlashAttention in fp32
    assert support(window, torch.bfloat16, 64) == AttentionCGSupport.NEVER


def test_decode_steps_read_the_same_persistent_buffers(tmp_path, gpu):
    """A decode-only step of a dense-decode plan: one FlashAttention call per layer over vLLM's
    persistent tensors, the same storage step after step (what a replayed graph reads)."""
    builder, impls = make_backend(make_plan(A_SHAPE, DENSE, dense_below=DENSE_BELOW), tmp_path, batched=True)
    step = Step([Req(70, 1, False), Req(90, 1, False)], seed=13)
    md = builder.build(0, step.common)
    query = step.query(14)
    out = run_layer(impls[0], 0, step, md, query)
    assert gpu.kinds() == ["flash"]
    for i in range(2):
        torch.testing.assert_close(out[step.rows(i)], step.reference(query, i, step.causal(i)), atol=ATOL, rtol=0)
    step.common.seq_lens.add_(1)  # vLLM updates its persistent buffers in place between steps
    md2 = builder.build(0, step.common)
    a, b = md.batched.flash_rows[(True, True)], md2.batched.flash_rows[(True, True)]
    assert a.seqused_k.data_ptr() == b.seqused_k.data_ptr() == step.common.seq_lens.data_ptr()
    assert a.cu_seqlens_q.data_ptr() == b.cu_seqlens_q.data_ptr() == step.common.query_start_loc.data_ptr()
    assert a.block_table.data_ptr() == b.block_table.data_ptr()
