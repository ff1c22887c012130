"""The profiler's decode side, chosen by optimisation (``--decode optimize``, the default).

Every head's decode candidates (``decode_candidates``: dense, and sink + window selections of a
few widths) are scored on the answer rows of the calibration prompts (the rows that stand in for
decode queries) by the mass they keep (``DecodeScores``; or the output quality), priced by the
measured time of one decode step (``DecodeCosts``), and ``choose_decode`` picks one per head with
a MILP that maximises the kept mass under a decode time budget at every calibration length. Its
cost model follows the server's routing: a layer whose heads all decode densely is one call of
the fast dense path (vLLM's op on CPU), a layer with any selecting head runs the sparse decode
kernel for every head of the layer, and on CPU a plan with any such layer keeps its cache in the
layout the torch kernel reads, which may slow the op's dense layers (``DecodeCosts.op_shared``).
The rules (TidalDecode, matched windows, all dense) are in ``profile_decode_rules``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .base import PatternModel
from .profile import ScoreTotals
from .profile_sample import RowSample, attend
from .profile_decode_rules import DECODE_MODES

DECODE_CHOICES = ("optimize", *DECODE_MODES)  # --decode: the optimised choice, or a rule
# Tie-break weight on decode time in the objective: among candidates that keep the same mass, the
# faster one, without ever trading mass for time (as ``profile._DENSITY_TIE_BREAK``).
_TIME_TIE_BREAK = 1e-6


def decode_candidates(lengths: Sequence[int], sink: int = 64) -> list[PatternModel]:
    """Dense plus sink + window selections whose widths halve from half the longest calibration
    length (an 8K profile tries windows of 256..4096): a window as long as the prompt keeps
    everything dense keeps and only costs kernel time. Widths are whole 32-token pages."""
    from .dense import Dense
    from .window import Window

    longest = max(lengths)
    widths = sorted({max(32, int(round(longest / 2 ** i / 32)) * 32) for i in range(1, 6)})
    return [Dense(), *(Window(sink=sink, window=w) for w in widths if w + sink < longest)]


def answer_rows(sample: RowSample) -> torch.Tensor:
    """``[n]`` bool over ``sample.rows``: the last sampled block, the rows that stand in for decode
    queries (a retrieval prompt's answer; as ``TidalScores`` reads them)."""
    return sample.rows // sample.block_m == sample.blocks[-1]


def decode_keep_mask(spec: PatternModel, pos: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[n, S]`` bool: the cached tokens ``spec`` reads for a decode query at each position of
    ``pos`` (``seq_len`` = S keys); the semantics of ``kernels.decode.selection_positions``: a
    window reads ``[0, min(sink, len))`` and ``[max(len - window, sink), len)``, ``len = p + 1``."""
    j = torch.arange(seq_len, device=pos.device).view(1, -1)
    length = (pos + 1).view(-1, 1)
    if spec.type == "dense":
        return j < length
    if spec.type != "window":
        raise ValueError(f"decode_keep_mask: decode candidates are dense or window, found {spec.type!r}")
    sink = torch.clamp(length, max=spec.sink)
    start = torch.maximum(length - spec.window, sink)
    return (j < sink) | ((j >= start) & (j < length))


def decode_kept_mass(spec: PatternModel, sample: RowSample, rows: torch.Tensor) -> torch.Tensor:
    """``[H, n]`` the probability each answer row (``rows``: bool over ``sample.rows``) keeps on the
    tokens ``spec`` reads, from the sample's prefix sums (two ranges: no mask is built)."""
    prefix = sample.prefix[:, rows]  # [H, n, S + 1]
    length = (sample.rows[rows] + 1).view(1, -1, 1).expand(prefix.shape[0], -1, 1)
    total = prefix.gather(2, length)
    if spec.type == "dense":
        return total[..., 0].float()
    sink = length.clamp(max=spec.sink)
    start = torch.maximum(length - spec.window, sink)
    return (prefix.gather(2, sink) + total - prefix.gather(2, start))[..., 0].float()


def decode_output_quality(spec: PatternModel, sample: RowSample, rows: torch.Tensor,
                          values: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[H]`` one minus the relative error of the answer rows' attention output when they read
    only ``spec``'s tokens (``profile_sample.output_quality`` for a decode selection). ``values``: the
    sample's ``sample_values``. Holds one masked copy of the answer rows' probabilities."""
    grouped, dense = values
    probs = sample.probs[:, rows]  # [H, n, S]
    mask = decode_keep_mask(spec, sample.rows[rows], probs.shape[2])
    kept = probs * mask[None]
    out = attend(kept, grouped) / kept.sum(-1, keepdim=True).clamp_min(1e-30)
    ref = dense[:, rows]
    err = (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
    return (1.0 - err.clamp(max=1.0)).mean(-1)


@dataclass
class DecodeScores(ScoreTotals):
    """Running sums over prompts of each decode candidate's kept mass (and output quality) on the
    answer rows, per (layer, head, candidate, length): ``ProfileScores`` for the decode side."""

    num_layers: int
    num_heads: int
    candidates: list[PatternModel]
    lengths: list[int]
    mass_sum: np.ndarray = field(init=False)
    quality_sum: np.ndarray | None = field(init=False)  # None until a score with values arrives
    count: np.ndarray = field(init=False)  # [layers, lengths]

    def __post_init__(self) -> None:
        if not self.candidates or self.candidates[0].type != "dense":
            raise ValueError("DecodeScores: candidate 0 must be dense (the budget is relative to it)")
        self.mass_sum = np.zeros((self.num_layers, self.num_heads, len(self.candidates), len(self.lengths)))
        self.quality_sum = None
        self.count = np.zeros((self.num_layers, len(self.lengths)), dtype=np.int64)

    def add(self, layer: int, length_index: int, sample: RowSample,
            values: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Score one layer of one prompt on the sample ``score_layer`` already took (its softmax is
        reused, nothing is recomputed); ``values`` adds the output quality."""
        if sample.probs.shape[0] != self.num_heads:
            raise ValueError(f"DecodeScores: built for {self.num_heads} heads, the sample has {sample.probs.shape[0]}")
        rows = answer_rows(sample)
        for c, spec in enumerate(self.candidates):
            self.mass_sum[layer, :, c, length_index] += decode_kept_mass(spec, sample, rows).mean(-1).double().cpu().numpy()
            if values is not None:
                if self.quality_sum is None:
                    self.quality_sum = np.zeros_like(self.mass_sum)
                self.quality_sum[layer, :, c, length_index] += \
                    decode_output_quality(spec, sample, rows, values).double().cpu().numpy()
        self.count[layer, length_index] += 1



@dataclass
class DecodeCosts:
    """Seconds of one decode step of one layer (all its heads) at each calibration length.

    op:        ``[N]`` every head dense on the server's dense path (vLLM's op on CPU, in the cache
               layout a plan whose decode is all dense keeps).
    op_shared: ``[N]`` the same, in the layout the cache keeps once any layer decodes through the
               torch kernel (CPU: ``vec`` instead of stock's AMX pages); equal to ``op`` where the
               candidates run where dense does (sink + window heads on vLLM's CPU op).
    kernel:    ``[C, N]`` every head on candidate ``c`` the way the server runs a layer that has a
               selecting head (on CPU, vLLM's op over the pages each head keeps; elsewhere the sparse
               decode kernel, dense heads included).
    """

    op: np.ndarray
    op_shared: np.ndarray
    kernel: np.ndarray

    OP, OP_SHARED = "dense (server's dense path)", "dense (server's dense path, kernel-readable cache)"

    def to_seconds(self, candidates: Sequence[PatternModel]) -> dict[str, list[float]]:
        """The provenance's ``decode_seconds``: a label per row (``profile.describe`` for candidates)."""
        from .profile import describe

        out = {self.OP: [round(float(x), 7) for x in self.op],
               self.OP_SHARED: [round(float(x), 7) for x in self.op_shared]}
        out.update({describe(c): [round(float(x), 7) for x in row] for c, row in zip(candidates, self.kernel)})
        return out

    @classmethod
    def from_seconds(cls, seconds: dict, candidates: Sequence[PatternModel], at: Sequence[int],
                     lengths: Sequence[int], where: str = "decode_seconds") -> "DecodeCosts":
        """The inverse of ``to_seconds`` for the ``lengths`` asked (timed at ``at``); names what is missing."""
        from .profile import describe

        missing = [n for n in lengths if n not in at]
        if missing:
            raise ValueError(f"{where}: timed at lengths {list(at)}, not at {missing}")
        pick = [list(at).index(n) for n in lengths]

        def row(label: str) -> np.ndarray:
            if label not in seconds:
                raise ValueError(f"{where}: no timing for {label!r}; it timed {sorted(seconds)}")
            return np.asarray(seconds[label], dtype=float)[pick]

        return cls(row(cls.OP), row(cls.OP_SHARED), np.stack([row(describe(c)) for c in candidates]))

    @classmethod
    def from_density(cls, candidates: Sequence[PatternModel], lengths: Sequence[int]) -> "DecodeCosts":
        """Costs as the share of cached tokens read (``--cost density``): dense 1 everywhere."""
        from .window import expected_decode_density

        kernel = np.array([[1.0 if c.type == "dense" else expected_decode_density(c, n) for n in lengths]
                           for c in candidates])
        ones = np.ones(len(lengths))
        return cls(ones, ones.copy(), kernel)


def _layer_costs(costs: DecodeCosts, num_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(op [N], delta [N], per_head [C, N])``: a dense layer's op time, what the op layout change
    adds to it, and each candidate's share of a kernel layer's time (a kernel layer's time is
    taken as the sum of its heads' shares: the torch kernel's work grows with the tokens each
    selection row reads)."""
    op = np.maximum(np.asarray(costs.op, dtype=float), 1e-12)
    return op, np.asarray(costs.op_shared, dtype=float) - op, np.asarray(costs.kernel, dtype=float) / num_heads


def decode_plan_cost(pick: np.ndarray, costs: DecodeCosts, dense_index: int = 0) -> np.ndarray:
    """``[N]`` the decode time of a choice ``pick [L, H]`` relative to every head dense, the way the
    server routes it: a layer whose heads all decode densely is one call of the dense path, any
    other layer runs all its heads on the kernel, and once any layer does, dense layers pay the
    op in the kernel-readable layout (``op_shared``)."""
    n_layers, n_heads = pick.shape
    op, delta, per_head = _layer_costs(costs, n_heads)
    on_kernel = (pick != dense_index).any(1)  # [L]
    shared = bool(on_kernel.any())
    total = np.zeros_like(op)
    for layer in range(n_layers):
        total += per_head[pick[layer]].sum(0) if on_kernel[layer] else op + shared * delta
    return total / (n_layers * op)


@dataclass
class DecodeChoice:
    """``choose_decode``'s answer: ``pick[layer, head]`` = decode candidate, plus what it achieves."""

    pick: np.ndarray  # [layers, heads] int
    kept: float  # mean objective (kept mass or output quality) over heads and lengths
    cost: list[float]  # decode time vs all-dense, per length (``decode_plan_cost``)
    status: str


def choose_decode(score: np.ndarray, costs: DecodeCosts, budget: float | Sequence[float], *,
                  dense_index: int = 0, time_limit: float = 60.0) -> DecodeChoice:
    """One decode candidate per head maximising the mean ``score`` ``[L, H, C, N]`` (kept mass or
    output quality on the answer rows) with the plan's decode time at most ``budget`` (one value
    or one per length) times all-dense's at every length, priced by ``decode_plan_cost`` (HiGHS MILP).

    Variables: ``x[l, h, c]`` (head ``h`` of layer ``l`` takes ``c``), with dense split in two
    (dense on the dense path, dense on the kernel beside selecting heads); ``z[l]`` (layer ``l``
    runs on the kernel: exactly when one of its heads selects) and ``g`` (some layer does: the
    cache changes layout). With ``T`` = op, ``Δ`` = op_shared - op and ``a[c]`` = a head's share of
    a kernel layer, a length's time is ``L T + L Δ g - (T + Δ) Σ z + Σ a x``: linear, since
    ``(1 - z) g = g - z`` when ``z <= g``. Every head dense meets any budget >= 1 and keeps the
    most, so a budget of 1 gives an all-dense plan wherever no selection is faster than dense.
    """
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_layers, n_heads, n_cand, n_len = score.shape
    if costs.kernel.shape != (n_cand, n_len):
        raise ValueError(f"choose_decode: kernel costs have shape {costs.kernel.shape}, expected {(n_cand, n_len)}")
    budgets = np.broadcast_to(np.asarray(budget, dtype=float), (n_len,)).copy()
    op, delta, per_head = _layer_costs(costs, n_heads)
    sparse_c = [c for c in range(n_cand) if c != dense_index]
    if sparse_c:  # the cheapest plan: every layer on its cheapest route, with one selecting head somewhere
        kernel_layer = per_head[sparse_c].min(0) + (n_heads - 1) * per_head.min(0)
        floor = np.minimum(1.0, ((n_layers - 1) * np.minimum(op + delta, kernel_layer) + kernel_layer)
                           / (n_layers * op))
    else:
        floor = np.ones(n_len)
    worst = int(np.argmax(floor - budgets))
    if floor[worst] > budgets[worst] + 1e-9:
        raise ValueError(f"choose_decode: budget {budgets[worst]:.3f} is below {floor[worst]:.3f}, the lowest "
                         f"decode time vs dense the candidates can reach at length number {worst} (on this "
                         f"device a decode selection is no faster than dense decode); raise the budget")

    # columns: x (L*H*(C+1): candidates, then "dense on the kernel"), z (L), g (1)
    n_opt = n_cand + 1
    n_x = n_layers * n_heads * n_opt
    n_var = n_x + n_layers + 1
    gcol = n_x + n_layers
    opt_score = np.concatenate([score, score[:, :, dense_index:dense_index + 1]], 2)  # [L, H, C+1, N]
    opt_cost = np.concatenate([per_head, per_head[dense_index:dense_index + 1]], 0)  # [C+1, N]
    opt_cost[dense_index] = 0.0  # a dense head on the dense path is paid by the layer's op call
    scale = 1.0 / (n_layers * op)  # [N]: seconds -> fraction of all-dense
    # budget rows: L Δ g - (T + Δ) Σ z + Σ a x <= L T (B - 1)
    rows = np.zeros((n_len, n_var))
    rows[:, :n_x] = np.tile(opt_cost.T[:, None, :], (1, n_layers * n_heads, 1)).reshape(n_len, n_x)
    rows[:, n_x:gcol] = -(op + delta)[:, None]
    rows[:, gcol] = n_layers * delta
    rows *= scale[:, None]
    caps = budgets - 1.0
    time_obj = rows.mean(0)  # mean over lengths of (relative time - 1)
    cost = np.concatenate([-opt_score.mean(-1).reshape(n_x), np.zeros(n_layers + 1)]) + _TIME_TIE_BREAK * time_obj
    blocks, lo, hi = [sparse.csr_matrix(rows)], [np.full(n_len, -np.inf)], [caps]
    i = np.arange(n_x)
    head_of, opt_of, layer_of = i // n_opt, i % n_opt, i // (n_heads * n_opt)
    # one option per head
    blocks.append(sparse.csr_matrix((np.ones(n_x), (head_of, i)), shape=(n_layers * n_heads, n_var)))
    lo.append(np.ones(n_layers * n_heads)), hi.append(np.ones(n_layers * n_heads))
    # selecting heads and dense-on-kernel heads need z[l] = 1 (x - z <= 0); dense-on-path needs z[l] = 0 (x + z <= 1)
    on_path = opt_of == dense_index
    sign = np.where(on_path, 1.0, -1.0)
    blocks.append(sparse.csr_matrix((np.r_[np.ones(n_x), sign], (np.r_[i, i], np.r_[i, n_x + layer_of])),
                                    shape=(n_x, n_var)))
    lo.append(np.full(n_x, -np.inf)), hi.append(on_path.astype(float))
    # z[l] <= number of selecting heads in layer l (a layer of dense heads stays on the dense path)
    selecting = ~on_path & (opt_of != n_cand)
    li = layer_of[selecting]
    blocks.append(sparse.csr_matrix((np.r_[np.ones(n_layers), -np.ones(len(li))],
                                     (np.r_[np.arange(n_layers), li], np.r_[n_x + np.arange(n_layers), i[selecting]])),
                                    shape=(n_layers, n_var)))
    lo.append(np.full(n_layers, -np.inf)), hi.append(np.zeros(n_layers))
    # z[l] <= g <= Σ z
    blocks.append(sparse.csr_matrix((np.r_[np.ones(n_layers), -np.ones(n_layers)],
                                     (np.r_[np.arange(n_layers), np.arange(n_layers)],
                                      np.r_[n_x + np.arange(n_layers), np.full(n_layers, gcol)])),
                                    shape=(n_layers, n_var)))
    lo.append(np.full(n_layers, -np.inf)), hi.append(np.zeros(n_layers))
    g_row = np.zeros((1, n_var))
    g_row[0, gcol], g_row[0, n_x:gcol] = 1.0, -1.0
    blocks.append(sparse.csr_matrix(g_row)), lo.append([-np.inf]), hi.append([0.0])
    res = milp(cost, constraints=LinearConstraint(sparse.vstack(blocks, format="csr"), np.concatenate(lo),
                                                  np.concatenate(hi)),
               integrality=np.ones(n_var), bounds=Bounds(np.zeros(n_var), np.ones(n_var)),
               options={"time_limit": time_limit})
    if res.x is None:
        raise ValueError(f"choose_decode: the MILP found no plan ({res.message}); try a larger budget")
    x = res.x[:n_x].reshape(n_layers, n_heads, n_opt)
    pick = x.argmax(-1)
    pick[pick == n_cand] = dense_index  # dense beside selecting heads is the dense spec
    li_, hi_ = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    kept = float(score[li_, hi_, pick].mean())
    return DecodeChoice(pick, kept, [float(c) for c in decode_plan_cost(pick, costs, dense_index)], res.message)
