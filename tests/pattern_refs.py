"""Slow, loop-by-loop references for the pattern tests: each written from a pattern's definition,
independently of the vectorised builders (no shared helpers), so a test compares two derivations."""

from __future__ import annotations

import torch


def causal_mask(q_len: int, q_offset: int) -> torch.Tensor:
    """``[q_len, S]`` bool: query i (position q_offset + i) may see key j <= its position."""
    s = q_offset + q_len
    return torch.arange(s)[None, :] <= (q_offset + torch.arange(q_len))[:, None]


def block_of(i: int, block_m: int, q_offset: int, q_len: int) -> tuple[int, int]:
    """Absolute (start, end) of the query block holding chunk query i."""
    b = i // block_m
    start = q_offset + b * block_m
    return start, min(start + block_m, q_offset + q_len)


def sink_window_mask(sink: int, window: int, q_len: int, q_offset: int, block_m: int) -> torch.Tensor:
    """``[q_len, S]``: keys < sink, or within ``window`` of the first query of the query's block."""
    s = q_offset + q_len
    m = torch.zeros(q_len, s, dtype=torch.bool)
    for i in range(q_len):
        bs, _ = block_of(i, block_m, q_offset, q_len)
        p = q_offset + i
        for j in range(p + 1):
            m[i, j] = j < sink or j >= bs - window + 1
    return m


def vertical_slash_mask(cols: list[int], offs: list[int], q_len: int, q_offset: int, block_m: int) -> torch.Tensor:
    """``[q_len, S]`` from kept columns and diagonal offsets, per the MInference block layout."""
    s = q_offset + q_len
    m = torch.zeros(q_len, s, dtype=torch.bool)
    for i in range(q_len):
        _, be = block_of(i, block_m, q_offset, q_len)
        p = q_offset + i
        for o in offs:
            for j in range(max(0, be - o - block_m), max(0, be - o)):
                if j <= p:
                    m[i, j] = True
        for c in cols:
            if c <= p:
                m[i, c] = True
    return m


def strided_mask(local_blocks: int, vert_stride: int, shift: int, block: int, q_len: int, q_offset: int,
                 block_m: int) -> torch.Tensor:
    s = q_offset + q_len
    m = torch.zeros(q_len, s, dtype=torch.bool)
    for i in range(q_len):
        _, be = block_of(i, block_m, q_offset, q_len)
        last = (be - 1) // block
        p = q_offset + i
        for j in range(p + 1):
            kb = j // block
            m[i, j] = kb > last - local_blocks or (kb + shift) % vert_stride == 0
    return m


def last_q_probs_fp64(q_last: torch.Tensor, k: torch.Tensor, kv_of: list[int], q_pos: list[int],
                      scale: float) -> torch.Tensor:
    """``[H, L, S]`` causal softmax, one (head, probe) row at a time, float64."""
    h, l_len, s = q_last.shape[1], q_last.shape[0], k.shape[0]
    out = torch.zeros(h, l_len, s, dtype=torch.float64)
    for hh in range(h):
        for i in range(l_len):
            n = q_pos[i] + 1
            logits = (k[:n, kv_of[hh]].double() @ q_last[i, hh].double()) * scale
            out[hh, i, :n] = torch.softmax(logits, 0)
    return out
