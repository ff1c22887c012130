"""Every prefill builder: format invariants, the promises of its pattern, and its definition.

Random lengths and query offsets (a later chunk of a chunked prefill) come from hypothesis; the
expected masks come from the loop references in ``pattern_refs`` written from each definition.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.patterns import a_shape, block_sparse, elastic_window, hierarchical, strided, vertical_slash
from headwise.patterns.base import PrefillInputs
from headwise.patterns.ranges import fast_density
from headwise.kernels import estimate
from pattern_legacy import block_sparse_before, hierarchical_before
from pattern_refs import causal_mask, sink_window_mask, strided_mask, vertical_slash_mask

FAST = settings(max_examples=25, deadline=None)
# query lengths: 1 (a single-token chunk), odd, past one block; offsets: a first chunk and later ones
q_lens = st.integers(1, 150)
offsets = st.integers(0, 140)
GQA = st.sampled_from([(1, 1), (3, 3), (9, 3), (8, 2)])  # (heads, kv heads)


def inputs(q_len, q_offset, h=1, hkv=1, d=16, seed=0, static=False, block_m=64) -> PrefillInputs:
    g = torch.Generator().manual_seed(seed)
    s = q_offset + q_len
    return PrefillInputs(
        heads=list(range(h)), num_layer_heads=h, num_layer_kv_heads=hkv, q_offset=q_offset, q_len=q_len,
        total_len=s, q=None if static else torch.randn(q_len, h, d, generator=g),
        k=None if static else torch.randn(s, hkv, d, generator=g),
        kv_heads=torch.arange(h) // (h // hkv), block_m=block_m)


def kept_pairs(idx) -> torch.Tensor:
    return idx.to_dense_mask()


@FAST
@given(q_lens, offsets, st.integers(0, 100), st.integers(1, 200))
def test_a_shape_matches_its_definition(q_len, q_offset, sink, window):
    spec = a_shape.AShape(sink=sink, window=window)
    idx = a_shape.build_prefill(spec, inputs(q_len, q_offset, h=2, static=True))
    idx.check()
    want = sink_window_mask(sink, window, q_len, q_offset, 64) & causal_mask(q_len, q_offset)
    assert torch.equal(kept_pairs(idx)[0], want) and torch.equal(kept_pairs(idx)[1], want)
    assert abs(fast_density(idx) - want.sum().item() / causal_mask(q_len, q_offset).sum().item()) < 1e-12


@FAST
@given(q_lens, offsets, st.integers(0, 1024), st.floats(0, 1))
def test_elastic_window_span_grows_with_total_length(q_len, q_offset, alpha, beta):
    spec = elastic_window.ElasticWindow(sink=16, alpha=alpha, beta=beta)
    inp = inputs(q_len, q_offset, static=True)
    inp.total_len = q_offset + q_len + 100
    span = elastic_window.span(spec, inp.total_len)
    assert span % 64 == 0 and abs(span - max(64, alpha + beta * inp.total_len)) <= 32
    idx = elastic_window.build_prefill(spec, inp)
    idx.check()
    want = sink_window_mask(16, span, q_len, q_offset, 64) & causal_mask(q_len, q_offset)
    assert torch.equal(kept_pairs(idx)[0], want)


@FAST
@given(q_lens, offsets, st.integers(1, 4), st.integers(1, 5), st.integers(0, 3), GQA, st.sampled_from([16, 64]))
def test_strided_matches_its_definition(q_len, q_offset, local, stride, offset, gqa, block):
    h, hkv = gqa
    spec = strided.Strided(local_blocks=local, vert_stride=stride, offset=offset, block_size=block)
    idx = strided.build_prefill(spec, inputs(q_len, q_offset, h, hkv, static=True))
    idx.check()
    step = max(1, stride // hkv)
    mask = kept_pairs(idx)
    for head in range(h):
        shift = (head // (h // hkv)) * step + offset  # per KV head: a GQA group shares its shard
        want = strided_mask(local, stride, shift, block, q_len, q_offset, 64) & causal_mask(q_len, q_offset)
        assert torch.equal(mask[head], want), f"head {head}"


@settings(max_examples=15, deadline=None)
@given(st.integers(65, 300), st.integers(1, 4))
def test_strided_kv_heads_together_cover_every_block(q_len, hkv):
    """S2's claim: with at least ``vert_stride`` KV heads, the union of the shards is the context."""
    spec = strided.Strided(local_blocks=1, vert_stride=hkv, block_size=16)
    mask = kept_pairs(strided.build_prefill(spec, inputs(q_len, 0, hkv, hkv, static=True)))
    assert torch.equal(mask.any(0), causal_mask(q_len, 0))


@FAST
@given(q_lens, offsets, st.integers(0, 40), st.integers(1, 60), st.integers(1, 20), GQA, st.integers(0, 999))
def test_vertical_slash_promises(q_len, q_offset, vertical, slash, local, gqa, seed):
    h, hkv = gqa
    spec = vertical_slash.VerticalSlash(vertical=vertical, slash=slash, last_q=64, sink_columns=5,
                                        local_diagonals=local)
    inp = inputs(q_len, q_offset, h, hkv, seed=seed)
    idx = vertical_slash.build_prefill(spec, inp)
    idx.check()
    mask = kept_pairs(idx)
    s = q_offset + q_len
    causal = causal_mask(q_len, q_offset)
    pos = q_offset + torch.arange(q_len)
    # the first sink columns and the nearest local diagonals (main one included) are always kept
    keys = torch.arange(s)
    sinks = (keys[None, :] < 5) & causal
    local_band = ((pos[:, None] - keys[None, :]) < local) & causal
    assert bool((mask >= sinks).all()) and bool((mask >= local_band).all())
    assert bool(mask[:, torch.arange(q_len), pos].all()), "a query lost its own key"
    # budgets: columns per block, and each kept diagonal costs at most one block_m-wide window
    forced_cols = min(5, s)
    assert int(idx.column_count.max()) <= max(vertical, forced_cols)
    widths = ((idx.range_end - idx.range_start) * (torch.arange(idx.range_start.shape[2]) < idx.range_count[..., None]))
    assert int(widths.sum(-1).max()) <= max(slash, min(local, s)) * 64


@FAST
@given(q_lens, offsets, st.data())
def test_vertical_slash_index_is_the_mask_of_its_selection(q_len, q_offset, data):
    """The vectorised window/column layout equals the per-query loop over the same selection."""
    s = q_offset + q_len
    cols = sorted(set(data.draw(st.lists(st.integers(0, s - 1), max_size=12))))
    offs = sorted(set(data.draw(st.lists(st.integers(0, s - 1), min_size=1, max_size=12))), reverse=True)
    big = 2**62
    c = torch.tensor([cols + [big]])
    o = torch.tensor([offs + [big]])
    idx = vertical_slash.index_from_selection(c, torch.tensor([len(cols)]), o, torch.tensor([len(offs)]),
                                              q_len, q_offset, 64)
    idx.check()
    want = vertical_slash_mask(cols, offs, q_len, q_offset, 64) & causal_mask(q_len, q_offset)
    assert torch.equal(kept_pairs(idx)[0], want)


def test_vertical_slash_finds_a_planted_column_and_diagonal():
    """Keys built so the probes attend to one far column and one diagonal: both must be chosen."""
    torch.manual_seed(0)
    s, d = 512, 32
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    k = torch.randn(s, 1, d) * 0.1
    q = torch.randn(s, 1, d) * 0.1
    k[200, 0] = 8 * u  # column 200: every probe query likes it
    q[:, 0] += 8 * u
    spec = vertical_slash.VerticalSlash(vertical=3, slash=2, sink_columns=1, local_diagonals=1)
    cols, n_cols, offs, n_diag = vertical_slash.select(spec, q, k, torch.zeros(1, dtype=torch.long), 0)
    assert 200 in cols[0, : int(n_cols[0])].tolist()
    assert 0 in offs[0, : int(n_diag[0])].tolist()


@FAST
@given(q_lens, offsets, st.integers(1, 6), st.booleans(), st.booleans(), GQA, st.integers(0, 999))
def test_block_sparse_promises(q_len, q_offset, top_k, sink, diag, gqa, seed):
    h, hkv = gqa
    spec = block_sparse.BlockSparse(top_k=top_k, force_sink=sink, force_diagonal=diag)
    inp = inputs(q_len, q_offset, h, hkv, seed=seed)
    idx = block_sparse.build_prefill(spec, inp)
    idx.check()
    s = q_offset + q_len
    nkb = -(-s // 64)
    for head in range(h):
        for qb in range(idx.num_q_blocks):
            bs = q_offset + qb * 64
            be = min(bs + 64, s)
            kept = set()
            for r in range(int(idx.range_count[head, qb])):
                a, b = int(idx.range_start[head, qb, r]), int(idx.range_end[head, qb, r])
                assert a % 64 == 0 and (b % 64 == 0 or b == s), "ranges are whole key blocks"
                kept |= set(range(a // 64, -(-b // 64)))
            causal_blocks = {kb for kb in range(nkb) if kb * 64 < be}
            forced = ({0} if sink else set()) | (set(range(bs // 64, (be - 1) // 64 + 1)) if diag else set())
            assert kept <= causal_blocks and forced <= kept
            assert len(kept) == max(len(forced), min(top_k, len(causal_blocks)))


def test_block_sparse_prefers_the_best_pooled_block():
    torch.manual_seed(3)
    s, d = 64 * 6, 16
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    q = torch.randn(s, 1, d) * 0.1 + 3 * u
    k = torch.randn(s, 1, d) * 0.1
    k[128:192, 0] += 3 * u  # key block 2 is what every query block wants
    inp = PrefillInputs(heads=[0], num_layer_heads=1, q_offset=0, q_len=s, total_len=s, q=q, k=k,
                        kv_heads=torch.zeros(1, dtype=torch.long))
    idx = block_sparse.build_prefill(block_sparse.BlockSparse(top_k=3), inp)
    mask = kept_pairs(idx)[0]
    assert bool(mask[192:, 128:192].all()), "blocks after key block 2 did not keep it"


@FAST
@given(q_lens, offsets, GQA, st.integers(0, 999))
def test_hierarchical_promises(q_len, q_offset, gqa, seed):
    h, hkv = gqa
    spec = hierarchical.Hierarchical(sink=8, window=24, stages=[{"chunk": 16, "budget": 64}, {"chunk": 4, "budget": 16}],
                                     refresh=[2, 1])
    idx = hierarchical.build_prefill(spec, inputs(q_len, q_offset, h, hkv, seed=seed))
    idx.check()
    mask = kept_pairs(idx)
    s = q_offset + q_len
    keys = torch.arange(s)
    causal = causal_mask(q_len, q_offset)
    for i in range(q_len):
        bs = q_offset + (i // 64) * 64
        always = ((keys < 8) | (keys >= bs - 24 + 1)) & causal[i]
        assert bool((mask[:, i] >= always).all()), "sink or window missing"
        extra = mask[:, i] & ~always
        assert int(extra.sum(-1).max()) <= 16, "more than the last stage's budget"
        region = int(max(0, bs - 24 + 1 - 8))
        if region <= 16:  # everything fits the budget: nothing may be dropped
            assert torch.equal(mask[:, i], causal[i].expand(h, -1))


def test_hierarchical_descends_to_the_best_keys():
    """Scores rising with position: halving always prefers the right half, so the pick is the last
    ``budget / chunk`` units before the window (units are aligned from the sink, so the last one is
    partial here: 4 units of 8 = [488, 513))."""
    s, d = 640, 8
    u = torch.zeros(d)
    u[0] = 1.0
    k = (torch.arange(s, dtype=torch.float32) / s)[:, None, None] * u
    q = u.expand(s, 1, d).clone()
    spec = hierarchical.Hierarchical(sink=0, window=64, stages=[{"chunk": 32, "budget": 128}, {"chunk": 8, "budget": 32}],
                                     refresh=[1, 1])
    inp = PrefillInputs(heads=[0], num_layer_heads=1, q_offset=0, q_len=s, total_len=s, q=q, k=k,
                        kv_heads=torch.zeros(1, dtype=torch.long))
    mask = kept_pairs(hierarchical.build_prefill(spec, inp))[0]
    qi = s - 1  # last block starts at 576; window starts at 576 - 64 + 1 = 513
    win = 576 - 64 + 1
    assert mask[qi, :win].nonzero().flatten().tolist() == list(range(488, win))


def test_expected_density_of_static_patterns_is_their_density():
    from headwise.patterns.base import DensityContext

    for spec, mod in ((a_shape.AShape(sink=64, window=256), a_shape),
                      (elastic_window.ElasticWindow(sink=64, alpha=256, beta=0.0), elastic_window)):
        idx = mod.build_prefill(spec, inputs(1000, 0, static=True))
        assert abs(mod.expected_density(spec, 1000, DensityContext()) - idx.density()) < 1e-12
    spec = strided.Strided(local_blocks=2, vert_stride=4)
    ctx = DensityContext(num_layer_heads=9, num_layer_kv_heads=3)
    idx = strided.build_prefill(spec, inputs(1000, 0, 9, 3, static=True))
    assert abs(strided.expected_density(spec, 1000, ctx) - idx.density()) < 1e-12


def test_dynamic_expected_density_bounds_the_achieved_one():
    from headwise.patterns.base import DensityContext

    ctx = DensityContext()
    for spec, mod, bound in (
            (vertical_slash.VerticalSlash(vertical=50, slash=120, local_diagonals=30), vertical_slash,
             vertical_slash.worst_case_density),
            (block_sparse.BlockSparse(top_k=3), block_sparse, block_sparse.expected_density),
            (hierarchical.Hierarchical(sink=16, window=64, stages=[{"chunk": 16, "budget": 128}], refresh=[1]),
             hierarchical, hierarchical.expected_density)):
        idx = mod.build_prefill(spec, inputs(700, 0, 3, 3, seed=5))
        assert idx.density() <= bound(spec, 700, ctx) + 1e-9, spec.type
        assert mod.expected_density(spec, 700, ctx) <= bound(spec, 700, ctx) + 1e-9


def test_vertical_slash_in_block_chunks_equals_one_pass(monkeypatch):
    """Long prompts are laid out a few query blocks at a time; the result must not depend on it."""
    spec = vertical_slash.VerticalSlash(vertical=30, slash=25, local_diagonals=6)
    inp = inputs(600, 70, 3, 1, seed=9)
    whole = vertical_slash.build_prefill(spec, inp)
    monkeypatch.setattr(vertical_slash, "_CHUNK_ITEMS", 50)  # one query block per pass
    for hold in (1 << 30, 2000, 0):  # every slice kept from the sizing pass, the first few, none (all rebuilt)
        monkeypatch.setattr(vertical_slash, "_HOLD_BYTES", hold)
        chunked = vertical_slash.build_prefill(spec, inp)
        chunked.check()
        assert torch.equal(chunked.to_dense_mask(), whole.to_dense_mask()), hold
        assert chunked.range_start.shape == whole.range_start.shape, "sized to the widest row either way"


@FAST
@given(q_lens, offsets, st.integers(1, 6), st.booleans(), st.booleans(), GQA, st.integers(0, 999))
def test_block_sparse_streamed_equals_the_whole_matrix_builder(q_len, q_offset, top_k, sink, diag, gqa, seed):
    """Issue 12: the tile-by-tile top-k keeps exactly the blocks the [H, NQB, NKB] version kept."""
    h, hkv = gqa
    spec = block_sparse.BlockSparse(top_k=top_k, force_sink=sink, force_diagonal=diag)
    inp = inputs(q_len, q_offset, h, hkv, seed=seed)
    want = block_sparse_before(spec, inp)
    for tile in (1 << 22, 1):  # one tile, and one key block per tile (the streaming merge at every step)
        monkey = estimate.pooled_score_tiles.__defaults__
        estimate.pooled_score_tiles.__defaults__ = (None, tile)
        try:
            got = block_sparse.build_prefill(spec, inp)
        finally:
            estimate.pooled_score_tiles.__defaults__ = monkey
        got.check()
        assert torch.equal(got.to_dense_mask(), want.to_dense_mask())


HIP_SPECS = [dict(sink=8, window=24, stages=[{"chunk": 16, "budget": 64}, {"chunk": 4, "budget": 16}], refresh=[2, 1]),
             dict(sink=0, window=1, stages=[{"chunk": 8, "budget": 32}], refresh=[1]),  # one stage, no sink
             dict(sink=5, window=40, stages=[{"chunk": 32, "budget": 64}, {"chunk": 8, "budget": 32},
                                             {"chunk": 2, "budget": 8}], refresh=[4, 2, 1])]


@FAST
@given(q_lens, offsets, GQA, st.integers(0, 999), st.sampled_from(HIP_SPECS))
def test_hierarchical_bounded_equals_the_stored_candidates_builder(q_len, q_offset, gqa, seed, spec):
    """Issue 12: implicit stage-1 candidates and a host-fixed number of rounds give the same index."""
    h, hkv = gqa
    spec = hierarchical.Hierarchical(**spec)
    inp = inputs(q_len, q_offset, h, hkv, seed=seed)
    got = hierarchical.build_prefill(spec, inp)
    got.check()
    assert torch.equal(got.to_dense_mask(), hierarchical_before(spec, inp).to_dense_mask())
