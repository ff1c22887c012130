"""The paged KV cache: every token lands at its slot in the layout vLLM's CPU op reads, padding and
other slots untouched; reads follow the block table."""

from __future__ import annotations

import pytest
import torch

from headwise.server.plugin import cpu_ops
from headwise.server.plugin.kv_cache import read_kv, split_kv, write_kv

NB, HKV, BS, D = 12, 3, 16, 8


def _raw(kv: torch.Tensor, block: int, head: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ``offset`` of ``(block, head)`` read from the raw memory: on CPU the block's K is
    stored transposed ([D, block_size]) and its V plainly ([block_size, D]) after it."""
    nb, h, bs, d2 = kv.shape
    d = d2 // 2
    page = kv.reshape(nb, h, 2 * bs * d)[block, head]
    return page[: bs * d].view(d, bs)[:, offset], page[bs * d:].view(bs, d)[offset]


@pytest.mark.parametrize("slots, why", [
    (list(range(35, 35 + 40)), "a prefill chunk: runs inside blocks, crossing two block edges"),
    ([5 * BS + 3, 2 * BS + 15, 9 * BS, 7 * BS + 1], "decodes: one token per request, scattered"),
    ([BS * b + 2 for b in range(NB)] + list(range(0, 70)), "more runs than the slice path takes"),
    ([17, -1, 18, -1], "padding slots (-1) are never written"),
])
def test_write_kv_puts_each_token_at_its_slot(slots, why):
    slots = list(dict.fromkeys(slots))  # a slot is written once per step
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(NB, HKV, BS, 2 * D, generator=g)
    before = kv.clone()
    t = len(slots)
    key, value = torch.randn(t, HKV, D, generator=g), torch.randn(t, HKV, D, generator=g)
    write_kv(key, value, kv, torch.tensor(slots))
    written = set()
    for i, s in enumerate(slots):
        if s >= 0:
            for h in range(HKV):
                k, v = _raw(kv, s // BS, h, s % BS)
                assert torch.equal(k, key[i, h]) and torch.equal(v, value[i, h]), why
            written.add(s)
    untouched = [s for s in range(NB * BS) if s not in written]
    for s in untouched[::7]:
        for h in range(HKV):
            assert all(torch.equal(a, b) for a, b in zip(_raw(kv, s // BS, h, s % BS), _raw(before, s // BS, h, s % BS)))


def test_read_kv_follows_the_block_table_and_split_views_alias_the_cache():
    kv = torch.zeros(NB, HKV, BS, 2 * D)
    table = torch.tensor([7, 2, 9], dtype=torch.int32)
    key = torch.arange(40 * HKV * D, dtype=torch.float32).view(40, HKV, D)
    slots = torch.tensor([int(table[p // BS]) * BS + p % BS for p in range(40)])
    write_kv(key, -key, kv, slots)
    k, v = read_kv(kv, table, 40)
    assert torch.equal(k, key) and torch.equal(v, -key)
    k_cache, v_cache = split_kv(kv)
    assert k_cache.shape == (NB, HKV, BS, D) and k_cache.data_ptr() == kv.data_ptr()
    assert torch.equal(v_cache[7, :, 0], -key[0])


def test_read_kv_keys_only():
    kv = torch.randn(NB, HKV, BS, 2 * D)
    table = torch.tensor([4, 0, 11], dtype=torch.int32)
    k, v = read_kv(kv, table, 37)
    k_only, none = read_kv(kv, table, 37, keys_only=True)
    assert none is None and torch.equal(k_only, k) and k.shape == (37, HKV, D)
    assert torch.equal(v[20, 1], _raw(kv, 0, 1, 4)[1])  # position 20 = block 1 (physical 0), offset 4


@pytest.mark.skipif(not cpu_ops.available(torch.bfloat16, 64), reason="vLLM's CPU attention op is not here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_layout_is_the_one_vllms_cpu_writer_produces(dtype, monkeypatch):
    from vllm import _custom_ops as ops

    nb, bs, d, t = 6, 32, 64, 150
    g = torch.Generator().manual_seed(1)
    key, value = (torch.randn(t, HKV, d, generator=g).to(dtype) for _ in range(2))
    slots = torch.randperm(nb * bs, generator=g)[:t]
    ours = torch.zeros(nb, HKV, bs, 2 * d, dtype=dtype)
    with monkeypatch.context() as m:  # headwise's own torch writer (it hands the op this cache otherwise)
        m.setattr(cpu_ops, "decode_available", lambda kv_cache: False)
        write_kv(key, value, ours, slots)
    theirs = torch.zeros(nb, HKV, bs, 2 * d, dtype=dtype)
    k_pages, v_pages = theirs.view(nb, HKV, 2 * bs, d).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, k_pages, v_pages, slots, cpu_ops.CACHE_ISA)
    assert torch.equal(ours, theirs)


def test_read_kv_of_a_single_block_is_contiguous():
    kv = torch.randn(NB, HKV, BS, 2 * D)
    k, v = read_kv(kv, torch.tensor([3], dtype=torch.int32), 10)
    assert k.is_contiguous() and v.is_contiguous()


@pytest.mark.skipif(not cpu_ops.available(torch.bfloat16, 64), reason="vLLM's CPU attention op is not here")
def test_a_cache_the_op_can_read_is_written_by_the_op_with_the_same_result(monkeypatch):
    nb, bs, d = 4, 32, 64
    g = torch.Generator().manual_seed(2)
    key, value = (torch.randn(70, HKV, d, generator=g).bfloat16() for _ in range(2))
    slots = torch.cat([torch.arange(5, 60), torch.tensor([-1] * 5), torch.arange(90, 100)])
    by_op = torch.zeros(nb, HKV, bs, 2 * d, dtype=torch.bfloat16)
    write_kv(key, value, by_op, slots)
    monkeypatch.setattr(cpu_ops, "decode_available", lambda kv_cache: False)
    by_torch = torch.zeros_like(by_op)
    write_kv(key, value, by_torch, slots)
    assert torch.equal(by_op, by_torch) and by_op.abs().sum() > 0
