"""Shared helpers for the kernel tests: random indices/selections, caches, dtype tolerances."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from headwise.kernels import DecodeMode, DecodeSelection, SparseIndex

# fp32: the kernels and the reference sum the same products in different orders; with
# O(100) keys of unit-variance data that moves results by ~1e-6, so 1e-4 leaves margin without
# hiding a wrong key (which moves outputs by ~1e-1).
FP32_ATOL = 1e-4
# LSE in bf16 runs: inputs are the same bf16 values in both, products are exact in fp32, only the
# summation order differs (~1e-5); a wrong or missing key shifts the LSE by ~1e-2 or more.
LSE_ATOL = {torch.float32: 1e-4, torch.bfloat16: 2e-3, torch.float16: 2e-3}


def random_index(heads: int, q_len: int, q_offset: int, *, seed: int, empty_block: bool = False,
                 max_ranges: int = 3, max_cols: int = 10, block_m: int = 64) -> SparseIndex:
    """Random ranges (some crossing the causal horizon) and columns per (head, block)."""
    rng = random.Random(seed)
    s = q_offset + q_len
    nqb = -(-q_len // block_m)
    ranges, cols = [], []
    for h in range(heads):
        rr, cc = [], []
        for b in range(nqb):
            if empty_block and b == nqb // 2:
                rr.append([])
                cc.append([])
                continue
            pieces = []
            for _ in range(rng.randint(0, max_ranges)):
                st = rng.randrange(s)
                pieces.append((st, min(s, st + rng.randint(1, 90))))
            rr.append(pieces)
            cc.append(rng.sample(range(s), rng.randint(0, min(s, max_cols))))
        ranges.append(rr)
        cols.append(cc)
    idx = SparseIndex.from_lists(ranges, cols, q_len, q_offset, block_m)
    idx.check()
    return idx


def qkv(q_len: int, seq_len: int, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(q_len, hq, d, generator=g).to(dtype)
    k = torch.randn(seq_len, hkv, d, generator=g).to(dtype)
    v = torch.randn(seq_len, hkv, d, generator=g).to(dtype)
    return q, k, v


def torch_bf16_error(q, k, v, mask, ref, scale=None) -> float:
    """Max error of PyTorch's own low-precision SDPA against the fp32 reference (rows with keys)."""
    group = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1)[None]
    kh = k.transpose(0, 1).repeat_interleave(group, 0)[None]
    vh = v.transpose(0, 1).repeat_interleave(group, 0)[None]
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[None], scale=scale)[0].transpose(0, 1)
    has_key = mask.any(-1).transpose(0, 1)  # [Tq, Hq]
    return float((o.float() - ref).abs()[has_key].max()) if bool(has_key.any()) else 0.0


def assert_out_close(out, ref, dtype, torch_err: float = 0.0) -> None:
    """fp32: absolute 1e-4. bf16/fp16: no worse than twice PyTorch's own low-precision error
    (Liger's rule), plus one rounding step of the output (2^-8 relative of the largest value)."""
    err = float((out.float() - ref).abs().max()) if out.numel() else 0.0
    if dtype == torch.float32:
        tol = FP32_ATOL
    else:
        tol = 2 * torch_err + 2.0**-8 * float(ref.abs().max())
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g} ({dtype})"


def assert_lse_close(lse, ref_lse, dtype) -> None:
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "queries without keys differ"
    fin = ~torch.isinf(ref_lse)
    err = float((lse - ref_lse).abs()[fin].max()) if bool(fin.any()) else 0.0
    assert err <= LSE_ATOL[dtype], f"lse error {err:.3g} > {LSE_ATOL[dtype]} ({dtype})"


def paged_cache(seqs_k: list[torch.Tensor], seqs_v: list[torch.Tensor], block_size: int, seed: int,
                spare_blocks: int = 3):
    """Write per-request K/V ``[S_r, Hkv, D]`` into one vLLM-style cache
    ``[num_blocks, Hkv, block_size, 2D]`` with shuffled physical blocks; return strided K/V views
    and the block table ``[B, max_blocks]`` int32."""
    hkv, d = seqs_k[0].shape[1:]
    need = [-(-k.shape[0] // block_size) for k in seqs_k]
    total = sum(need) + spare_blocks
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(total, generator=g)
    # garbage everywhere, so reading an unselected/unwritten slot shows up as an error
    cache = torch.randn(total, hkv, block_size, 2 * d, generator=g).to(seqs_k[0].dtype) * 100
    table = torch.zeros(len(seqs_k), max(need), dtype=torch.int32)
    nxt = 0
    for r, (k, v) in enumerate(zip(seqs_k, seqs_v)):
        for blk in range(need[r]):
            phys = int(perm[nxt])
            nxt += 1
            table[r, blk] = phys
            part_k = k[blk * block_size:(blk + 1) * block_size]
            part_v = v[blk * block_size:(blk + 1) * block_size]
            cache[phys, :, : part_k.shape[0], :d] = part_k.transpose(0, 1)
            cache[phys, :, : part_v.shape[0], d:] = part_v.transpose(0, 1)
    return cache[..., :d], cache[..., d:], table


def random_selection(rng: random.Random, batch: int, heads: int, seq_lens: list[int], block_size: int,
                     k_max: int, modes: list[DecodeMode] | None = None) -> DecodeSelection:
    """Random per-(request, head) modes with valid data (sorted unique positions / blocks)."""
    mode = torch.zeros(batch, heads, dtype=torch.int32)
    sink = torch.zeros(batch, heads, dtype=torch.int32)
    window = torch.zeros(batch, heads, dtype=torch.int32)
    count = torch.zeros(batch, heads, dtype=torch.int32)
    indices = torch.zeros(batch, heads, k_max, dtype=torch.int32)
    for b in range(batch):
        n = seq_lens[b]
        for h in range(heads):
            m = rng.choice(modes or list(DecodeMode))
            mode[b, h] = int(m)
            sink[b, h] = rng.randint(0, 6)
            window[b, h] = rng.randint(1, n + 2)
            universe = n if m == DecodeMode.POSITIONS else -(-n // block_size)
            picked = sorted(rng.sample(range(universe), rng.randint(0, min(universe, k_max))))
            count[b, h] = len(picked)
            indices[b, h, : len(picked)] = torch.tensor(picked, dtype=torch.int32)
    return DecodeSelection(mode, sink, window, indices, count, block_size)


def structured_index(kind: str, heads: int, q_len: int, q_offset: int, *, seed: int, group: int = 1,
                     block_m: int = 64) -> SparseIndex:
    """Indices shaped like the pattern families (written here so kernel tests need no patterns):

    ``a_shape``: sink 32 + a 150-key window, the same for every head (identical heads stack);
    ``a_shape_wide``: sink 32 + a 600-key window (wide enough that several blocks share a call);
    ``vslash``: per head, random columns + the 64 nearest diagonals (a band) + 3 farther diagonals
    at head-specific offsets (relative windows that shift with the block: not nested);
    ``columns``: per head, a band of 40 keys + random columns (nested far keys);
    ``blocks``: per head and block, the diagonal block + 2 random earlier 64-key blocks;
    ``strided``: per KV head, 2 local blocks + every 3rd earlier block (shifted per KV head).
    """
    rng = random.Random(seed)
    s = q_offset + q_len
    nqb = -(-q_len // block_m)
    col_sets = [sorted(rng.sample(range(s), min(s, 40))) for _ in range(heads)]
    offs = [[rng.randrange(100, 400) for _ in range(3)] for _ in range(heads)]
    ranges, cols = [], []
    for h in range(heads):
        rr, cc = [], []
        for b in range(nqb):
            bs, be = q_offset + b * block_m, min(q_offset + (b + 1) * block_m, s)
            r: list[tuple[int, int]] = []
            c: list[int] = []
            if kind in ("a_shape", "a_shape_wide"):
                r = [(0, 32), (max(0, bs - (149 if kind == "a_shape" else 599)), be)]
            elif kind == "vslash":
                r = [(max(0, bs - 63), be)] + [(max(0, be - o - 64), max(0, be - o)) for o in offs[h]]
                c = [x for x in col_sets[h] if x < be]
            elif kind == "columns":
                r = [(max(0, bs - 40), be)]
                c = [x for x in col_sets[h] if x < be]
            elif kind == "blocks":
                r = [(bs, be)] + [(64 * kb, 64 * kb + 64) for kb in rng.sample(range(bs // 64), min(2, bs // 64))]
            elif kind == "strided":
                g = h // group
                r = [(max(0, bs - 128), be)] + [(64 * kb, 64 * kb + 64) for kb in range(bs // 64) if (kb + g) % 3 == 0]
            else:
                raise ValueError(kind)
            rr.append(r)
            cc.append(c)
        ranges.append(rr)
        cols.append(cc)
    idx = SparseIndex.from_lists(ranges, cols, q_len, q_offset, block_m)
    idx.check()
    return idx
