"""The profiler's decode rules: TidalDecode's selection schedule, scored and placed, and
``decode_for``, which gives every head a decode pattern by rule (``--decode auto|tidal|matched|dense``).

TidalDecode picks the top-``k`` positions by ``q . k`` in a *selection* layer and reuses them in
the layers after it until the next selection. Which layers select matters a lot on small models
(SmolLM2-135M kept passkeys with 4 selections at 500 tokens, lost them with 2). ``TidalScores``
measures, on the last sampled block of each calibration prompt (the answer rows: the rows that
stand in for decode queries), how much of layer ``l``'s attention mass falls on the positions
layer ``j`` would pick, for every ``j < l``. ``choose_select_layers`` then places a given number
of selections to maximise the mass kept over all layers (an exact dynamic programme).
TidalDecode stays a rule: its selection layers couple the layers, which the per-head choice of
``profile_decode`` cannot price.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import PatternModel
from .profile_sample import RowSample

DECODE_MODES = ("auto", "tidal", "matched", "dense")  # the rules of ``decode_for``


class TidalScores:
    """``reuse[j, l, h]``: mean mass head ``h`` of layer ``l`` keeps, over the answer rows, on the
    top-``k`` positions head ``h`` of layer ``j`` picks (a reuse layer reads the pick of the same
    query head)."""

    def __init__(self, num_layers: int, top_k: int, num_heads: int = 1):
        self.num_layers, self.top_k = num_layers, top_k
        self.mass_sum = np.zeros((num_layers, num_layers, num_heads))
        self.count = np.zeros((num_layers, num_layers), dtype=np.int64)
        self._picks: dict[int, torch.Tensor] = {}  # this prompt's picks per layer: [H, n, k]

    def add(self, layer: int, sample: RowSample) -> None:
        """Score one layer of the current prompt (layers arrive in order; layer 0 starts a prompt)."""
        if layer == 0:
            self._picks = {}
        last = sample.rows // sample.block_m == sample.blocks[-1]  # the last sampled block's rows
        probs = sample.probs[:, last]  # [H, n, S]
        pos = sample.rows[last]
        scores = probs.clone()
        # the current token is always read (as in tidal.choose); ranking by probability is ranking
        # by q . k within a row, since softmax is monotonic
        scores[:, torch.arange(len(pos)), pos] = float("inf")
        k = min(self.top_k, probs.shape[-1])
        if self.mass_sum.shape[2] != probs.shape[0]:
            raise ValueError(f"TidalScores: built for {self.mass_sum.shape[2]} heads, the sample has {probs.shape[0]}")
        for j, pick in self._picks.items():
            kept = probs.gather(-1, pick).sum(-1)  # [H, n]
            self.mass_sum[j, layer] += kept.mean(-1).double().numpy()
            self.count[j, layer] += 1
        self._picks[layer] = scores.topk(k, dim=-1).indices

    def reuse(self) -> np.ndarray:
        """``[L, L, H]`` mean kept mass (``nan`` where not measured, i.e. ``j >= l``)."""
        count = self.count[..., None]
        return np.where(count > 0, self.mass_sum / np.maximum(count, 1), np.nan)


def choose_select_layers(reuse: np.ndarray, selections: int, first: int = 2) -> tuple[list[int], float]:
    """Selection layers maximising the mean decode mass over layers, the first one at ``first``.

    Layers before ``first`` and selection layers attend densely (mass 1); a layer after selection
    ``j`` keeps ``reuse[j, l]``. Exact DP over (layer of the latest selection, selections left).
    Returns the layers and the mean mass per layer they achieve.
    """
    n = reuse.shape[0]
    if first >= n or selections < 1:
        return [], 1.0
    r = np.nan_to_num(reuse, nan=0.0)
    # run[i, e] = sum of r[i, l] for i < l < e: the mass of reusing i's pick up to (not incl.) e
    run = np.zeros((n, n + 1))
    for i in range(n):
        run[i, i + 2:] = np.cumsum(r[i, i + 1:])[: max(0, n - i - 1)]
    best = {}  # (i, c) -> (mass of layers i..n-1 with a selection at i and c more to place, next layer)

    def g(i: int, c: int) -> tuple[float, int | None]:
        if (i, c) in best:
            return best[(i, c)]
        option = (1.0 + run[i, n], None)
        if c > 0:
            for nxt in range(i + 1, n):
                value = 1.0 + run[i, nxt] + g(nxt, c - 1)[0]
                if value > option[0] + 1e-12:
                    option = (value, nxt)
        best[(i, c)] = option
        return option

    total, layers, i, c = first + g(first, selections - 1)[0], [first], first, selections - 1
    while True:
        nxt = g(i, c)[1]
        if nxt is None:
            break
        layers.append(nxt)
        i, c = nxt, c - 1
    return layers, total / n


def default_select_layers(num_layers: int, first: int = 2, selections: int = 4) -> list[int]:
    """An unmeasured schedule: ``first`` (layers before it decode densely), then re-selections
    spread evenly over the rest."""
    if num_layers <= first:
        return []
    step = max(1, -(-(num_layers - first) // max(1, selections)))
    return list(range(first, num_layers, step))


def decode_for(prefill: PatternModel, layer: int, select_layers: Sequence[int], mode: str = "auto",
               top_k: int | None = None, reuse_ok: bool = True) -> PatternModel:
    """The decode spec of one head, given its prefill spec and the TidalDecode schedule.

    * ``auto`` and ``tidal``: every head follows TidalDecode: dense before the first selection
      layer, ``select`` on selection layers (every head of such a layer selects, so a later
      ``reuse`` always has a pick), ``reuse`` elsewhere. In ``auto`` a head measured to lose too
      much of its attention on the pick it would reuse (``reuse_ok=False``) stays dense.
    * ``matched``: window-like prefill (``a_shape``, ``elastic_window``, ``strided``) keeps the
      same span in decode, every other head is dense. Not the default: on SmolLM2 at 2K tokens,
      windowed decode heads whose prefill windows kept ~all their mass still lost passkeys (the
      few answer tokens that copy the needle are what matters, not the mean).
    * ``dense``: every head dense.
    """
    from .dense import Dense
    from .tidal import Tidal
    from .window import Window

    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode {mode!r}: expected one of {DECODE_MODES}")
    if mode == "dense":
        return Dense()
    if mode == "matched":
        if prefill.type == "a_shape":
            return Window(sink=prefill.sink, window=prefill.window)
        if prefill.type in ("elastic_window", "strided"):
            return prefill
        return Dense()
    if not select_layers or layer < min(select_layers):
        return Dense()
    if layer in select_layers:
        return Tidal(role="select", top_k=top_k)
    if mode == "auto" and not reuse_ok:
        return Dense()
    return Tidal(role="reuse", top_k=top_k)
