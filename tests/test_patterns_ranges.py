"""The vectorised interval helpers every builder ends with, against plain-Python set arithmetic."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.kernels.index import SparseIndex
from headwise.patterns.ranges import compact, drop_covered, fast_density, merge_intervals, ranges_from_mask

FAST = settings(max_examples=40, deadline=None)

# rows of (start, end, valid) intervals; ends may precede starts (empty) on purpose
intervals = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60), st.booleans()), min_size=1, max_size=12)


def covered(rows) -> set[int]:
    return {x for s, e, v in rows if v for x in range(s, e)}


@FAST
@given(st.lists(intervals, min_size=1, max_size=4))
def test_merge_intervals_is_the_union_as_sorted_disjoint_ranges(rows):
    n = max(len(r) for r in rows)
    pad = [r + [(0, 0, False)] * (n - len(r)) for r in rows]
    s = torch.tensor([[a for a, _, _ in r] for r in pad])
    e = torch.tensor([[b for _, b, _ in r] for r in pad])
    v = torch.tensor([[c for _, _, c in r] for r in pad])
    rs, re, rc = merge_intervals(s, e, v)
    for i, r in enumerate(rows):
        got = [(int(rs[i, j]), int(re[i, j])) for j in range(int(rc[i]))]
        assert {x for a, b in got for x in range(a, b)} == covered(r)
        for (a0, b0), (a1, b1) in zip(got, got[1:]):
            assert b0 < a1, f"ranges {got} touch or overlap"  # touching ranges must have merged
        assert all(b > a for a, b in got)


@FAST
@given(st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=1, max_size=3), st.integers(1, 16),
       st.integers(0, 15))
def test_ranges_from_mask_covers_the_true_units(rows, unit, clip):
    mask = torch.tensor(rows)
    seq_len = 6 * unit - min(clip, unit - 1)  # the last unit may be partial
    rs, re, rc = ranges_from_mask(mask, unit, seq_len)
    for i, r in enumerate(rows):
        want = {x for u, on in enumerate(r) if on for x in range(u * unit, min((u + 1) * unit, seq_len))}
        got = {x for j in range(int(rc[i])) for x in range(int(rs[i, j]), int(re[i, j]))}
        assert got == want


@FAST
@given(st.lists(st.integers(0, 50), min_size=1, max_size=10), intervals)
def test_drop_covered_keeps_sorted_unique_columns_outside_ranges(cols, rows):
    s = torch.tensor([[a for a, _, _ in rows]])
    e = torch.tensor([[b for _, b, _ in rows]])
    v = torch.tensor([[c for _, _, c in rows]])
    rs, re, rc = merge_intervals(s, e, v)
    c = torch.tensor([cols])
    vals, count = drop_covered(c, torch.ones_like(c, dtype=torch.bool), rs, re, rc)
    got = vals[0, : int(count[0])].tolist()
    assert got == sorted(set(cols) - covered(rows))


def test_compact_moves_kept_items_to_the_front_in_order():
    vals, count = compact(torch.tensor([[5, 1, 9, 3]]), torch.tensor([[True, False, True, True]]))
    assert count.tolist() == [3] and vals[0, :3].tolist() == [3, 5, 9]


@FAST
@given(st.integers(1, 200), st.integers(0, 150), st.data())
def test_fast_density_equals_the_per_query_count(q_len, q_offset, data):
    """Two derivations of one number: the closed form per block vs SparseIndex's count per query."""
    s = q_offset + q_len
    nqb = -(-q_len // 64)
    ranges = [[[tuple(sorted(data.draw(st.tuples(st.integers(0, s), st.integers(0, s)))))
                for _ in range(data.draw(st.integers(0, 3)))] for _ in range(nqb)] for _ in range(2)]
    cols = [[data.draw(st.lists(st.integers(0, s - 1), max_size=4)) for _ in range(nqb)] for _ in range(2)]
    idx = SparseIndex.from_lists(ranges, cols, q_len, q_offset)
    assert abs(fast_density(idx) - idx.density()) < 1e-12
