"""``build_layer_prefill_index``: grouping by spec, head order, per-step caching, TP slices, dense fallback."""

from __future__ import annotations

import torch

from headwise.kernels.index import SparseIndex
from headwise.patterns.a_shape import AShape
from headwise.patterns.base import PrefillInputs
from headwise.patterns.block_sparse import BlockSparse
from headwise.patterns.dense import Dense
from headwise.patterns.prefill import IndexCache, build_layer_prefill_index, build_prefill, is_static
from headwise.patterns.strided import Strided
from headwise.patterns.vertical_slash import VerticalSlash

H, HKV, D = 9, 3, 16  # SmolLM2's head layout: 3 query heads per KV head
MIXED = [VerticalSlash(vertical=20, slash=10, local_diagonals=8), AShape(sink=4, window=40), Dense(),
         Strided(local_blocks=1, vert_stride=3), AShape(sink=4, window=40), BlockSparse(top_k=2),
         VerticalSlash(vertical=20, slash=10, local_diagonals=8), Strided(local_blocks=1, vert_stride=3), Dense()]


def qk(tq: int, s: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tq, H, D, generator=g), torch.randn(s, HKV, D, generator=g)


def one_head(spec, h: int, q, k, q_offset: int) -> SparseIndex:
    """Build head ``h`` alone, the slow way, as the reference for the grouped build."""
    inp = PrefillInputs(heads=[h], num_layer_heads=H, num_layer_kv_heads=HKV, q_offset=q_offset, q_len=q.shape[0],
                        total_len=k.shape[0], q=q[:, [h]], k=k, kv_heads=torch.tensor([h // 3]))
    return build_prefill(spec, inp)


def test_grouped_build_equals_each_head_built_alone():
    q, k = qk(150, 250)
    idx = build_layer_prefill_index(MIXED, list(range(H)), H, q, k, torch.arange(H) // 3, 100, 250,
                                    num_layer_kv_heads=HKV)
    idx.check()
    mask = idx.to_dense_mask()
    for h, spec in enumerate(MIXED):
        assert torch.equal(mask[h], one_head(spec, h, q, k, 100).to_dense_mask()[0]), f"head {h} ({spec.type})"


def test_a_tensor_parallel_slice_builds_the_same_heads():
    """Rank 1 of TP=3 serves global heads 3..5 with local KV head 0; its index equals those rows."""
    q, k = qk(130, 130, seed=1)
    full = build_layer_prefill_index(MIXED, list(range(H)), H, q, k, torch.arange(H) // 3, 0, 130,
                                     num_layer_kv_heads=HKV).to_dense_mask()
    part = build_layer_prefill_index(MIXED[3:6], [3, 4, 5], H, q[:, 3:6], k[:, 1:2], torch.zeros(3, dtype=torch.long),
                                     0, 130, num_layer_kv_heads=HKV).to_dense_mask()
    assert torch.equal(part, full[3:6])


def test_static_groups_are_shared_through_the_step_cache():
    cache: dict = {}
    specs = [AShape(sink=4, window=40)] * H
    a = build_layer_prefill_index(specs, list(range(H)), H, None, None, None, 0, 300, q_len=300, cache=cache)
    b = build_layer_prefill_index(specs, list(range(H)), H, None, None, None, 0, 300, q_len=300, cache=cache)
    assert len(cache) == 1 and a is b
    assert is_static(specs[0]) and not is_static(VerticalSlash())
    # with a dense tail the tailed copy is shared as well, and its last block keeps every key
    c = build_layer_prefill_index(specs, list(range(H)), H, None, None, None, 0, 300, q_len=300, cache=cache,
                                  dense_tail=10)
    d = build_layer_prefill_index(specs, list(range(H)), H, None, None, None, 0, 300, q_len=300, cache=cache,
                                  dense_tail=10)
    assert c is d and c is not a and bool(c.to_dense_mask()[:, 299].all()) and not bool(a.to_dense_mask()[:, 299].all())


def test_a_bounded_cache_keeps_indices_up_to_its_budget_and_builds_the_rest_each_time():
    specs = [Strided(local_blocks=1, vert_stride=3)] * H

    def chunk(cache, c0):  # one 128-query chunk of a 640-token prompt, as the transformers path cuts it
        return build_layer_prefill_index(specs, list(range(H)), H, None, None, None, c0, 640, q_len=128,
                                         cache=cache)

    unbounded = IndexCache()
    sizes = [chunk(unbounded, c0).nbytes for c0 in range(0, 640, 128)]
    assert len(unbounded) == 5 and unbounded.bytes == sum(sizes) and sizes[4] > sizes[0]  # later chunks see more keys
    budget = sizes[0] + sizes[1]  # room for the first two chunks' indices, not for a third
    cache = IndexCache(budget)
    built = [chunk(cache, c0) for c0 in range(0, 640, 128)]
    assert len(cache) == 2 and cache.bytes == budget
    again = [chunk(cache, c0) for c0 in range(0, 640, 128)]  # the next layer
    assert [a is b for a, b in zip(built, again)] == [True, True, False, False, False]
    for a, b in zip(built, again):  # a rebuilt index is the same index
        assert torch.equal(a.to_dense_mask(), b.to_dense_mask())


def test_dense_below_and_all_dense_give_the_dense_index():
    q, k = qk(100, 100)
    for idx in (build_layer_prefill_index(MIXED, list(range(H)), H, q, k, None, 0, 100, dense_below=101,
                                          num_layer_kv_heads=HKV),
                build_layer_prefill_index([Dense()] * H, list(range(H)), H, q, k, None, 0, 100)):
        assert torch.equal(idx.to_dense_mask(), SparseIndex.dense(H, 100).to_dense_mask())
