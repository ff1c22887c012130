"""The plain-torch paged KV write: every token lands at its slot, padding and other slots untouched."""

from __future__ import annotations

import pytest
import torch

from headwise.server.kv_cache import read_kv, split_kv, write_kv

NB, HKV, BS, D = 12, 3, 16, 8


@pytest.mark.parametrize("slots, why", [
    (list(range(35, 35 + 40)), "a prefill chunk: runs inside blocks, crossing two block edges"),
    ([5 * BS + 3, 2 * BS + 15, 9 * BS, 7 * BS + 1], "decodes: one token per request, scattered"),
    ([BS * b + 2 for b in range(NB) for _ in range(1)] * 1 + list(range(0, 70)), "more runs than the slice path takes"),
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
    expected = before.clone()
    for i, s in enumerate(slots):
        if s >= 0:
            expected[s // BS, :, s % BS, :D] = key[i]
            expected[s // BS, :, s % BS, D:] = value[i]
    assert torch.equal(kv, expected), why


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
    assert torch.equal(v[20], kv[0, :, 4, D:])  # position 20 = block 1 (physical 0), offset 4
