"""The profiler's mathematics: score candidate patterns per head, then pick one per head by MILP.

A candidate is a prefill pattern spec (``Dense``, ``AShape``, ``VerticalSlash``, ...). For one
calibration prompt and one layer we know every head's queries and keys; a candidate is judged by

* **kept mass** — the share of each sampled query's dense softmax probability that falls on the
  keys the candidate's index keeps (1.0 = the pattern loses nothing for that query), averaged over
  a sample of query blocks spread over the second half of the prompt (the last block included,
  where a question sits), and
* **density** — the fraction of causal (query, key) pairs its index keeps over the whole prompt
  (``kept_pairs`` of the indices actually built, so dynamic patterns are measured, not guessed).

A long prompt is scored chunk by chunk, as serving's chunked prefill builds its indices
(``score_layer(chunk=)``), so its memory is bounded by a chunk, not the prompt. The sampled rows,
and what an index keeps of them, are ``profile_sample``'s.

``ProfileScores`` accumulates both per (layer, head, candidate, length); ``choose_patterns`` then
solves a multiple-choice knapsack as a MILP (SciPy's HiGHS): maximise the total kept mass subject
to the mean density (averaged over lengths, optionally at every length) staying under a budget,
optionally with at most ``k`` distinct patterns per layer (each distinct spec is one index build
per layer at serving time). Nothing here imports transformers: the caller captures q/k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from headwise.kernels.index import SparseIndex

from .base import PatternModel, PrefillInputs
from .prefill import build_prefill
from .profile_sample import RowSample, grouped_values, kept_mass, output_errors, sample_blocks, sample_values
from .ranges import kept_pairs

BuildFn = Callable[[PatternModel, PrefillInputs], SparseIndex]
# Tie-break weight on density in the objective: among candidates that keep the same mass (e.g. a
# window wider than the prompt and dense), prefer the sparser one, without ever trading mass for it.
_DENSITY_TIE_BREAK = 1e-6


def describe(spec: PatternModel) -> str:
    """A short, stable label: ``a_shape(sink=64,window=256)``."""
    args = ",".join(f"{k}={v}" for k, v in spec.model_dump(exclude={"type"}).items())
    return f"{spec.type}({args})"


# -------------------------------------------------------------------------- scoring
@dataclass
class LayerScore:
    """One layer of one prompt: ``mass [H, C]`` (mean kept probability), ``density [H, C]``,
    ``quality [H, C]`` (``output_quality``; None without values), the row sample they were
    measured on and its ``sample_values`` (the decode scorers reuse both rather than recompute
    the softmax; None without values)."""

    mass: np.ndarray
    density: np.ndarray
    sample: RowSample | None = None
    quality: np.ndarray | None = None
    values: tuple[torch.Tensor, torch.Tensor] | None = None


def score_layer(q: torch.Tensor, k: torch.Tensor, candidates: Sequence[PatternModel], *, layer_heads: int,
                layer_kv_heads: int, n_blocks: int = 4, block_m: int = 64, scale: float | None = None,
                build: BuildFn = build_prefill, total_len: int | None = None, v: torch.Tensor | None = None,
                tail: int = 0, chunk: int | None = None) -> LayerScore:
    """Score every candidate on every head of one layer of one prompt.

    q: ``[S, Hq, D]`` (every query of the prompt, RoPE applied); k, v: ``[S, Hkv, D]`` (v optional:
    it adds ``output_quality``); ``tail``: the plan's dense tail (``sample_blocks``).
    Each candidate's index is built once for all heads (as serving would, with the layer's
    global head numbering), then judged on the sampled rows.

    ``chunk``: the queries run this many at a time, as serving's chunked prefill builds them (each
    chunk's index over the keys up to its last query; ``None``: the whole prompt as one chunk).
    Only one chunk's indices and its sampled rows' probabilities are alive at once, so a 128K
    prompt's memory is bounded by the chunk, not the prompt; density counts every chunk's pairs.
    The returned ``sample`` is the last chunk's that holds sampled rows (the answer rows the decode
    scorers read), with its ``values``.
    """
    s, hq, _ = q.shape
    if hq != layer_heads or k.shape[1] != layer_kv_heads:
        raise ValueError(f"score_layer: q/k have {hq}/{k.shape[1]} heads, expected {layer_heads}/{layer_kv_heads}")
    if chunk is not None and chunk <= 0:
        raise ValueError(f"score_layer: chunk must be a positive number of queries or None, found {chunk}")
    group = hq // layer_kv_heads
    kv_heads = torch.arange(hq) // group
    blocks = sample_blocks(s, n_blocks, block_m, tail)
    step = s if chunk is None or chunk >= s else max(block_m, chunk // block_m * block_m)
    grouped = grouped_values(v, kv_heads) if v is not None else None
    kept = torch.zeros(len(candidates), hq, dtype=torch.int64)
    causal = 0
    mass_rows: list[torch.Tensor] = []  # per chunk with samples: [C, H, n_chunk]
    error_rows: list[torch.Tensor] = []
    sample = RowSample.of_blocks(q, k, kv_heads, [], block_m, scale)  # replaced by the last chunk's
    values = None
    for c0 in range(0, s, step):
        c1 = min(s, c0 + step)
        inp = PrefillInputs(heads=list(range(hq)), num_layer_heads=hq, q_offset=c0, q_len=c1 - c0,
                            total_len=total_len or s, q=q[c0:c1], k=k[:c1], kv_heads=kv_heads, block_m=block_m,
                            num_layer_kv_heads=layer_kv_heads, scale=scale)
        mine = [b for b in blocks if c0 <= b * block_m < c1]
        if mine:
            sample = RowSample.of_blocks(q, k[:c1], kv_heads, mine, block_m, scale)
            values = sample_values(sample, v, kv_heads, grouped) if grouped is not None else None
        causal += (c1 - c0) * c0 + (c1 - c0) * (c1 - c0 + 1) // 2
        masses, errors = [], []
        for c, spec in enumerate(candidates):
            index = build(spec, inp)
            for h in range(hq):  # per head: the transients of one head's ranges
                kept[c, h] += int(kept_pairs(index.select_heads([h])))
            if mine:
                masses.append(kept_mass(index, sample))
                if values is not None:
                    errors.append(output_errors(index, sample, values))
            del index
        if mine:
            mass_rows.append(torch.stack(masses))
            if values is not None:
                error_rows.append(torch.stack(errors))
    if not mass_rows:  # nothing sampled (a dense tail over the whole prompt): nothing measured
        mass_rows = [torch.full((len(candidates), hq, 1), float("nan"))]
        error_rows = [torch.full((len(candidates), hq, 1), float("nan"))] if grouped is not None else []
    mass = torch.cat(mass_rows, -1).mean(-1).T.cpu().numpy().astype(np.float64)
    quality = (1.0 - torch.cat(error_rows, -1)).mean(-1).T.cpu().numpy().astype(np.float64) if error_rows else None
    density = (kept.T.double() / causal).numpy() if causal else np.zeros((hq, len(candidates)))
    return LayerScore(mass, density, sample, quality, values)


class ScoreTotals:
    """Per-prompt scores summed (``mass_sum``, ``quality_sum``: ``[layers, heads, candidates,
    lengths]``) with the prompts each layer saw at each length (``count``); means on demand."""

    mass_sum: np.ndarray
    quality_sum: np.ndarray | None
    count: np.ndarray
    lengths: list[int]

    def _mean(self, total: np.ndarray) -> np.ndarray:
        if (self.count == 0).any():
            layer, li = np.argwhere(self.count == 0)[0]
            raise ValueError(f"{type(self).__name__}: layer {layer} has no prompt of length {self.lengths[li]} scored")
        return total / self.count[:, None, None, :]

    def mass(self) -> np.ndarray:
        """``[layers, heads, candidates, lengths]`` mean kept mass."""
        return self._mean(self.mass_sum)

    def quality(self) -> np.ndarray:
        """``[layers, heads, candidates, lengths]`` mean output quality (``output_quality``)."""
        if self.quality_sum is None:
            raise ValueError(f"{type(self).__name__}: no output quality was measured (the capture handed no values)")
        return self._mean(self.quality_sum)


@dataclass
class ProfileScores(ScoreTotals):
    """Running sums over prompts of kept mass and density per (layer, head, candidate, length)."""

    num_layers: int
    num_heads: int
    candidates: list[PatternModel]
    lengths: list[int]
    mass_sum: np.ndarray = field(init=False)
    density_sum: np.ndarray = field(init=False)
    quality_sum: np.ndarray | None = field(init=False)  # None until a score with output quality arrives
    count: np.ndarray = field(init=False)  # [layers, lengths] prompts seen

    def __post_init__(self) -> None:
        shape = (self.num_layers, self.num_heads, len(self.candidates), len(self.lengths))
        self.mass_sum = np.zeros(shape)
        self.density_sum = np.zeros(shape)
        self.quality_sum = None
        self.count = np.zeros((self.num_layers, len(self.lengths)), dtype=np.int64)

    def add(self, layer: int, length_index: int, score: LayerScore) -> None:
        self.mass_sum[layer, :, :, length_index] += score.mass
        self.density_sum[layer, :, :, length_index] += score.density
        if score.quality is not None:
            if self.quality_sum is None:
                self.quality_sum = np.zeros_like(self.mass_sum)
            self.quality_sum[layer, :, :, length_index] += score.quality
        self.count[layer, length_index] += 1

    def density(self) -> np.ndarray:
        """``[layers, heads, candidates, lengths]`` mean density."""
        return self._mean(self.density_sum)


# ---------------------------------------------------------------------------- MILP
@dataclass
class Choice:
    """The MILP's answer: ``pick[layer, head]`` = candidate number, plus what it achieves."""

    pick: np.ndarray  # [layers, heads] int
    kept_mass: float  # mean over heads and lengths
    density: list[float]  # mean over heads, per length
    status: str


def choose_patterns(mass: np.ndarray, density: np.ndarray, budget: float | Sequence[float], *,
                    allowed: np.ndarray | None = None,
                    per_length: bool = False, max_per_layer: int | None = None,
                    time_limit: float = 60.0) -> Choice:
    """One candidate per head maximising kept mass under a density budget (HiGHS MILP).

    mass, density: ``[L, H, C, N]`` (layers, heads, candidates, lengths): any per-head objective
    to maximise (kept mass, output quality) and any additive cost (density, measured time as a
    fraction of dense's: the profiler passes either). The constraint is on
    the mean density over heads and lengths (``per_length``: at every length). ``allowed``
    ``[L, H, C]`` bool forbids choices (e.g. forcing a layer dense). ``max_per_layer`` bounds the
    distinct candidates one layer may use. ``budget``: one value, or one per length (``per_length``).
    """
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_layers, n_heads, n_cand, n_len = mass.shape
    if density.shape != mass.shape:
        raise ValueError(f"choose_patterns: density has shape {density.shape}, expected {mass.shape} like mass")
    allowed = np.ones((n_layers, n_heads, n_cand), dtype=bool) if allowed is None else allowed.astype(bool)
    n_x = n_layers * n_heads * n_cand
    heads = n_layers * n_heads
    m = mass.mean(-1).reshape(n_x)
    d_all = density.reshape(n_x, n_len)
    d = d_all.mean(-1)
    # the cheapest allowed choice per head bounds what any plan can reach: say so instead of "infeasible"
    budgets = np.broadcast_to(np.asarray(budget, dtype=float), (n_len,)) if per_length else \
        np.asarray([float(budget)])
    if not per_length and np.ndim(budget):
        raise ValueError("choose_patterns: one budget per length needs per_length=True")
    if per_length:  # every length holds its own budget
        floors = np.where(allowed[..., None], density, np.inf).min(2).mean((0, 1))
    else:
        floors = np.asarray([np.where(allowed, density.mean(-1), np.inf).min(-1).mean()])
    worst = int(np.argmax(floors - budgets))
    if floors[worst] > budgets[worst] + 1e-9:
        raise ValueError(f"choose_patterns: budget {budgets[worst]:.3f} is below {floors[worst]:.3f}, the lowest "
                         f"mean cost (density or time vs dense) the allowed candidates can reach"
                         f"{f' at length number {worst}' if per_length else ''}; raise the budget or add cheaper "
                         f"candidates")

    n_y = n_layers * n_cand if max_per_layer else 0
    n_var = n_x + n_y
    cost = np.concatenate([-m + _DENSITY_TIE_BREAK * d, np.zeros(n_y)])
    blocks, lo, hi = [], [], []
    # sum_c x[l, h, c] = 1 for every head
    head_of = np.repeat(np.arange(heads), n_cand)
    blocks.append(sparse.csr_matrix((np.ones(n_x), (head_of, np.arange(n_x))), shape=(heads, n_var)))
    lo.append(np.ones(heads)), hi.append(np.ones(heads))
    budget_rows = d_all.T if per_length else d[None]  # [rows, n_x]
    for row, cap in zip(budget_rows, budgets):
        blocks.append(sparse.csr_matrix(np.concatenate([row, np.zeros(n_y)])[None] / heads))
        lo.append([-np.inf]), hi.append([cap])
    if max_per_layer:
        # x[l, h, c] <= y[l, c]: a candidate used in a layer is "open" there; sum_c y[l, c] <= k
        i = np.arange(n_x)
        layer_of = i // (n_heads * n_cand)
        y_of = n_x + layer_of * n_cand + i % n_cand
        link = sparse.csr_matrix((np.r_[np.ones(n_x), -np.ones(n_x)], (np.r_[i, i], np.r_[i, y_of])),
                                 shape=(n_x, n_var))
        blocks.append(link), lo.append(np.full(n_x, -np.inf)), hi.append(np.zeros(n_x))
        j = np.arange(n_y)
        per_layer = sparse.csr_matrix((np.ones(n_y), (j // n_cand, n_x + j)), shape=(n_layers, n_var))
        blocks.append(per_layer), lo.append(np.full(n_layers, -np.inf)), hi.append(np.full(n_layers, max_per_layer))
    ub = np.concatenate([allowed.reshape(n_x).astype(float), np.ones(n_y)])
    a = sparse.vstack(blocks, format="csr")
    res = milp(cost, constraints=LinearConstraint(a, np.concatenate(lo), np.concatenate(hi)),
               integrality=np.ones(n_var), bounds=Bounds(np.zeros(n_var), ub),
               options={"time_limit": time_limit})
    if res.x is None:
        raise ValueError(f"choose_patterns: the MILP found no plan ({res.message}); try a larger budget "
                         f"or a larger max_per_layer")
    x = res.x[:n_x].reshape(n_layers, n_heads, n_cand)
    pick = x.argmax(-1)
    li, hi_ = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    chosen_mass = mass[li, hi_, pick]  # [L, H, N]
    chosen_density = density[li, hi_, pick]
    return Choice(pick, float(chosen_mass.mean()), [float(v) for v in chosen_density.mean((0, 1))], res.message)


# ------------------------------------------------------------------ candidates
def default_candidates(max_len: int, sink: int = 64) -> list[PatternModel]:
    """The search space, scaled to the longest calibration length ``max_len``.

    Windows and budgets are fractions of ``max_len`` (an 8K profile tries windows of 129..4097),
    so the same call serves an 8K or 32K profile. Dense is always a candidate: a head that loses
    too much under every sparse pattern stays dense, and so may whole layers.
    """
    from .a_shape import AShape
    from .block_sparse import BlockSparse
    from .dense import Dense
    from .elastic_window import ElasticWindow
    from .strided import Strided
    from .vertical_slash import VerticalSlash

    def r64(x: float) -> int:
        return max(64, int(round(x / 64)) * 64)

    blocks = max(1, max_len // 64)
    out: list[PatternModel] = [Dense()]
    # windows of whole 32-token pages plus the query itself (32k+1): on vLLM's CPU op they read no
    # partial page, so what the op computes is what the pattern keeps
    out += [AShape(sink=sink, window=r64(max_len * f) + 1) for f in (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)]
    # vertical budgets grow with length; the forced local diagonals stay near one block (their
    # windows already cover a block each), so most of the budget goes to columns
    out += [VerticalSlash(vertical=r64(max_len * f), slash=s, local_diagonals=min(s, 100))
            for f, s in ((1 / 32, 64), (1 / 16, 100), (1 / 8, 128))]
    out += [BlockSparse(top_k=max(2, blocks // d)) for d in (8, 4)]
    out += [Strided(local_blocks=lb, vert_stride=vs) for lb, vs in ((2, 8), (4, 8), (2, 4))]
    out += [ElasticWindow(sink=sink, alpha=a, beta=b) for a in (0, r64(max_len / 8)) for b in (0.125, 0.25)]
    return list(dict.fromkeys(out))  # small lengths can make two budgets equal
