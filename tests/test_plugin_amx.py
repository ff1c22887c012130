"""On CPUs where stock vLLM runs its AMX code path, headwise keeps the cache in that path's packed
layout whenever no torch kernel reads the pages in place (``cpu_ops.cache_isa``), so dense work runs
on the code path stock runs. Checked here against the same steps on the portable ``vec`` layout:
the writer, the op schedules (A-shape pages, dense rows, dense decode) and the one torch reader
left (``read_kv``, for estimation) agree. Skipped where stock would not use AMX (no AMX tiles)."""

from __future__ import annotations

import pytest
import torch
from types import SimpleNamespace

from headwise.patterns.plan import Plan
from headwise.server.plugin import cpu_ops, stats
from headwise.server.plugin.impl import HeadwiseImpl
from headwise.server.plugin.kv_cache import read_kv
from headwise.server.plugin.metadata import HeadwiseMetadataBuilder
from headwise.server.plugin.plan_binding import PlanBinding
from plugin_batches import fresh_recorder  # noqa: F401  (autouse)

HQ, HKV, D, BS = 6, 2, 64, 32
AMX = cpu_ops.available(torch.bfloat16, D) and cpu_ops.stock_isa(torch.bfloat16, BS, D) == cpu_ops.AMX_ISA
pytestmark = pytest.mark.skipif(not AMX, reason="stock vLLM would not run its AMX code path on this CPU")


def test_amx_pages_read_back_in_token_order():
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(3)
    nb, t = 7, 190
    key, value = (torch.randn(t, HKV, D, generator=g).bfloat16() for _ in range(2))
    cache = torch.zeros(nb, HKV, BS, 2 * D, dtype=torch.bfloat16)
    table = torch.randperm(nb, generator=g).to(torch.int32)
    slots = (table.long()[torch.arange(t) // BS] * BS + torch.arange(t) % BS)
    cpu_ops.cache_isa(torch.bfloat16, BS, D, torch_reads_pages=False)  # asks for AMX tiles
    ops.cpu_attn_reshape_and_cache(key, value, *cpu_ops.page_views(cache), slots, cpu_ops.AMX_ISA)
    k, v = read_kv(cache, table, t, isa=cpu_ops.AMX_ISA)
    assert torch.equal(k, key) and torch.equal(v, value)
    k_only, none = read_kv(cache, table, 101, keys_only=True, isa=cpu_ops.AMX_ISA)
    assert none is None and torch.equal(k_only, key[:101])


def test_the_layout_follows_the_plan():
    assert cpu_ops.cache_isa(torch.bfloat16, BS, D, torch_reads_pages=False) == cpu_ops.AMX_ISA
    assert cpu_ops.cache_isa(torch.bfloat16, BS, D, torch_reads_pages=True) == cpu_ops.CACHE_ISA
    assert cpu_ops.cache_isa(torch.float32, BS, D, torch_reads_pages=False) == cpu_ops.CACHE_ISA  # AMX: bf16 only
    plan = _plan({"type": "dense"})
    assert not PlanBinding(plan).torch_reads_pages
    assert PlanBinding(_plan({"type": "window", "sink": 4, "window": 64})).torch_reads_pages
    # the page grain: whole vLLM blocks only for sink/window prefill with dense decode
    assert not PlanBinding(plan).coarse_pages  # layer 2 estimates (vertical-slash): fine pages
    coarse = Plan.from_dict({**plan.model_dump(mode="json", exclude_none=True), "layers": {}})
    assert PlanBinding(coarse).coarse_pages


def _plan(decode: dict) -> Plan:
    return Plan.from_dict({
        "model": {"architecture": "LlamaForCausalLM", "num_layers": 3, "num_heads": HQ, "num_kv_heads": HKV,
                  "head_dim": D},
        "settings": {"dense_below": 0, "dense_tail": 32},
        "default": {"prefill": {"type": "a_shape", "sink": 32, "window": 96}, "decode": decode},
        "layers": {"0": {"prefill": {"type": "dense"}},
                   "2": {"prefill": {"type": "vertical_slash", "vertical": 16, "slash": 8, "local_diagonals": 8,
                                     "sink_columns": 4}}},
    })


def _run(monkeypatch, isa: str, tmp_path) -> list[torch.Tensor]:
    """A 700-token prompt in two chunks, then one decode step, through builder + impl; every output."""
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    monkeypatch.setattr(stats, "_RECORDER", None)
    monkeypatch.setattr(cpu_ops, "stock_isa", lambda dtype, block_size, head_dim: isa)
    plan = _plan({"type": "dense"})
    binding = PlanBinding(plan)
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4),
                          additional_config={"headwise": {"stats_dir": str(tmp_path / isa)}})
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HKV, head_size=D, dtype=torch.bfloat16)
    builder = HeadwiseMetadataBuilder(spec, [], cfg, torch.device("cpu"), binding=binding)
    assert builder.op is not None and builder.op.isa == isa
    impls = [HeadwiseImpl(HQ, D, D**-0.5, HKV, binding=binding) for _ in range(3)]
    g = torch.Generator().manual_seed(11)
    total = 700
    k_all, v_all = (torch.randn(total + 1, HKV, D, generator=g).bfloat16() for _ in range(2))
    q_all = torch.randn(total + 1, HQ, D, generator=g).bfloat16()
    nb = -(-(total + 1) // BS) + 2
    caches = [torch.zeros(nb, HKV, BS, 2 * D, dtype=torch.bfloat16) for _ in impls]
    table = torch.randperm(nb, generator=torch.Generator().manual_seed(5))[:nb - 2].to(torch.int32)[None]
    outs = []
    for start, end, prefilling in ((0, 400, True), (400, total, True), (total, total + 1, False)):
        n = end - start
        qsl = torch.tensor([0, n], dtype=torch.int32)
        pos = torch.arange(start, end)
        slots = table[0].long()[pos // BS] * BS + pos % BS
        common = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor([end], dtype=torch.int32), num_reqs=1,
            num_actual_tokens=n, max_query_len=n, max_seq_len=end, block_table_tensor=table, slot_mapping=slots,
            is_prefilling=torch.tensor([prefilling]))
        md = builder.build(0, common)
        for layer, (impl, cache) in enumerate(zip(impls, caches)):
            attn = SimpleNamespace(layer_name=f"model.layers.{layer}.self_attn.attn")
            impl.do_kv_cache_update(attn, k_all[start:end], v_all[start:end], cache, slots)
            out = torch.zeros(n, HQ, D, dtype=torch.bfloat16)
            impl.forward(attn, q_all[start:end], k_all[start:end], v_all[start:end], cache, md, out)
            assert impl._isa == isa
            outs.append(out.float())
    builder.recorder.stop()
    return outs


def test_amx_and_vec_caches_give_the_same_attention(monkeypatch, tmp_path):
    amx, vec = _run(monkeypatch, cpu_ops.AMX_ISA, tmp_path), _run(monkeypatch, cpu_ops.CACHE_ISA, tmp_path)
    assert len(amx) == len(vec) == 9  # 3 steps x 3 layers
    for a, v in zip(amx, vec):
        assert torch.isfinite(a).all()
        assert (a - v).abs().max() < 3e-2, (a - v).abs().max()  # bf16 outputs of two code paths
