"""Hand-built vLLM steps for driving the headwise builder and impl without an engine.

A ``Step`` holds requests as vLLM would schedule them (context already cached + new tokens),
random fp32 queries/keys/values, a paged cache whose context tokens are already written (earlier
steps) and whose new tokens are written through ``impl.do_kv_cache_update``, and the real
``CommonAttentionMetadata`` vLLM would pass to the builder. ``reference`` computes the expected
attention output from the *contiguous* keys/values with the dense-masked fp32 oracle, so paged
reads, KV writes and routing are all checked against an independent path.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from types import SimpleNamespace

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from headwise.kernels.reference import masked_attention_reference
from headwise.patterns.plan import Plan
from headwise.server.plugin.metadata import HeadwiseMetadataBuilder
from headwise.server.plugin.kv_cache import split_kv
from headwise.server.plugin.impl import HeadwiseImpl
from headwise.server.plugin.plan_binding import PlanBinding
from headwise.server.plugin import stats

HQ, HKV, D, BS = 6, 2, 32, 16  # GQA group of 3; small head dim and block size keep tests fast
SCALE = D**-0.5


def make_plan(prefill: dict, decode: dict, layers: dict | None = None, num_layers: int = 4, **settings) -> Plan:
    return Plan.from_dict({
        "model": {"architecture": "LlamaForCausalLM", "num_layers": num_layers, "num_heads": HQ,
                  "num_kv_heads": HKV, "head_dim": D},
        "settings": {"dense_below": 0, **settings},
        "default": {"prefill": prefill, "decode": decode},
        "layers": layers or {},
    })


@dataclass
class Req:
    context: int  # tokens already cached before this step
    q_len: int  # tokens computed in this step
    prefilling: bool  # vLLM's is_prefilling: still inside the prompt

    @property
    def seq_len(self) -> int:
        return self.context + self.q_len


class Step:
    def __init__(self, reqs: list[Req], seed: int = 0, flag_prefilling: bool = True,
                 kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 block_table: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None):
        """``block_table`` + ``kv_cache`` given: a later step of the same requests, whose context
        is already in that cache (written by the earlier steps)."""
        g = torch.Generator().manual_seed(seed)
        self.reqs = reqs
        b = len(reqs)
        # every position's K/V ([seq_len, HKV, D] each); given, when steps must share a request's keys
        self.k = [x[: r.seq_len] for (x, _), r in zip(kv, reqs)] if kv else \
            [torch.randn(r.seq_len, HKV, D, generator=g) for r in reqs]
        self.v = [y[: r.seq_len] for (_, y), r in zip(kv, reqs)] if kv else \
            [torch.randn(r.seq_len, HKV, D, generator=g) for r in reqs]
        q_lens = torch.tensor([r.q_len for r in reqs])
        self.qsl = torch.zeros(b + 1, dtype=torch.int32)
        self.qsl[1:] = torch.cumsum(q_lens, 0)
        self.num_tokens = int(self.qsl[-1])
        max_blocks = max(-(-r.seq_len // BS) for r in reqs)
        num_blocks = b * max_blocks + 3
        # scattered physical blocks, so a wrong block-table lookup reads someone else's data
        perm = torch.randperm(num_blocks, generator=g)
        self.block_table = perm[: b * max_blocks].view(b, max_blocks).to(torch.int32)
        self.kv_cache = torch.zeros(num_blocks, HKV, BS, 2 * D, dtype=self.k[0].dtype)
        carried = block_table is not None
        if carried:
            self.block_table, self.kv_cache = block_table, kv_cache
        slots = []
        for i, r in enumerate(reqs):
            for p in range(r.seq_len):
                blk, off = int(self.block_table[i, p // BS]), p % BS
                if p < r.context:  # cached by earlier steps
                    if carried:
                        continue
                    k_cache, v_cache = split_kv(self.kv_cache)
                    k_cache[blk, :, off] = self.k[i][p]
                    v_cache[blk, :, off] = self.v[i][p]
                else:
                    slots.append(blk * BS + off)
        self.slot_mapping = torch.tensor(slots, dtype=torch.int64)
        self.key = torch.cat([k[r.context:] for k, r in zip(self.k, reqs)])  # [T, HKV, D]
        self.value = torch.cat([v[r.context:] for v, r in zip(self.v, reqs)])
        self.seq_lens = torch.tensor([r.seq_len for r in reqs], dtype=torch.int32)
        self.common = CommonAttentionMetadata(
            query_start_loc=self.qsl, query_start_loc_cpu=self.qsl, seq_lens=self.seq_lens, num_reqs=b,
            num_actual_tokens=self.num_tokens, max_query_len=int(q_lens.max()),
            max_seq_len=int(self.seq_lens.max()), block_table_tensor=self.block_table,
            slot_mapping=self.slot_mapping,
            is_prefilling=torch.tensor([r.prefilling for r in reqs]) if flag_prefilling else None)

    def query(self, seed: int) -> torch.Tensor:
        return torch.randn(self.num_tokens, HQ, D, generator=torch.Generator().manual_seed(seed))

    def rows(self, i: int) -> slice:
        return slice(int(self.qsl[i]), int(self.qsl[i + 1]))

    def reference(self, query: torch.Tensor, i: int, mask: torch.Tensor) -> torch.Tensor:
        """Request ``i``'s output under ``mask`` ``[HQ, q_len, seq_len]`` from contiguous K/V (fp32 oracle)."""
        out, _ = masked_attention_reference(query[self.rows(i)], self.k[i], self.v[i], mask, SCALE)
        return out

    def causal(self, i: int) -> torch.Tensor:
        r = self.reqs[i]
        q_pos = r.context + torch.arange(r.q_len)
        return (torch.arange(r.seq_len)[None, :] <= q_pos[:, None]).expand(HQ, -1, -1)


class Layer(SimpleNamespace):
    """What the impl reads from vLLM's attention layer: its name."""


MAX_MODEL_LEN = 512  # the engine's max model length the builder is told (fixed decode selection widths)


def make_backend(plan: Plan, tmp_path, max_num_seqs: int = 8, batched: bool | None = None):
    """``batched=True``: the CUDA step plan (one launch per layer), run here on CPU tensors."""
    binding = PlanBinding(plan)
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
                          model_config=SimpleNamespace(max_model_len=MAX_MODEL_LEN),
                          additional_config={"headwise": {"stats_dir": str(tmp_path)}})
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HKV, head_size=D, dtype=torch.float32)
    builder = HeadwiseMetadataBuilder(spec, [], cfg, torch.device("cpu"), binding=binding, batched=batched)
    impls = [HeadwiseImpl(HQ, D, SCALE, HKV, binding=binding, batched=batched) for _ in range(plan.model.num_layers)]
    return builder, impls


def run_layer(impl: HeadwiseImpl, layer: int, step: Step, md, query: torch.Tensor, write: bool = True):
    attn = Layer(layer_name=f"model.layers.{layer}.self_attn.attn")  # vLLM passes its layer to both calls
    if write:
        impl.do_kv_cache_update(attn, step.key, step.value, step.kv_cache, step.slot_mapping)
    out = torch.full((step.num_tokens, HQ, D), float("nan"))
    impl.forward(attn, query, step.key, step.value, step.kv_cache, md, out)
    return out


@pytest.fixture(autouse=True)
def fresh_recorder(monkeypatch):
    """Each test's builder makes its own stats recorder (import this fixture into the test module)."""
    monkeypatch.setattr(stats, "_RECORDER", None)
    yield
    if stats._RECORDER is not None:
        stats._RECORDER.stop()
