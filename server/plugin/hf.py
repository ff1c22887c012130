"""headwise inside Hugging Face transformers: an ``attn_implementation`` that runs a Plan.

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="headwise")
    attach_plan(model, load_plan("configs/.../plan.json"))
    model.generate(...)

Importing this module registers ``"headwise"`` in transformers' attention interface (and a mask
function, so left-padding masks reach us). Every attention call lands in ``headwise_attention``,
which hands the layer to the ``HeadwiseRuntime`` that ``attach_plan`` bound to the model:

* a chunk of queries (prefill, possibly after a cached prefix) runs ``sparse_prefill`` over the
  index ``build_layer_prefill_index`` builds from the layer's prefill specs (dense below
  ``settings.dense_below``), one request at a time, in chunks of ``PREFILL_CHUNK`` queries as the
  engine's chunked prefill runs them (so a 128K prompt never holds a whole-prompt index);
* one new token with a KV cache (decode) runs ``sparse_decode`` with the layer's decode specs.
  An HF cache ``[B, Hkv, S, D]`` *is* a paged cache with ``block_size = S`` and
  ``block_table[b] = [b]``; TidalDecode's ``select`` layers write a ``TidalState`` that the
  ``reuse`` layers after them read within the same forward.

Same plan, same layer runner (``runner.py``: index and selection building, kernel launch, kept-pair
counting) as the vLLM backend. On CPU the engine's op reads whole pages (a superset of each prefill
index: 32 tokens, or vLLM's 128-token blocks for sink/window plans, ``plan_binding.cpu_page``);
``attach_plan`` rounds the same way there by default, so both attend to the same keys. Batches may be left-padded: each row
is cut (prefill) or shifted (decode) so that its first real token sits at position 0, which is
also what the RoPE positions of ``generate`` assume. Right padding is refused with a message.
A ``capture`` hook gives the profiler every layer's q/k/v while attention runs densely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from headwise.kernels.index import DecodeMode, DecodeSelection, SparseIndex
from headwise.patterns.plan import Plan, load_plan
from headwise.patterns.prefill import IndexCache
from headwise.patterns.ranges import fast_density
from headwise.patterns.tidal import TidalState

from . import cpu_ops, pages, runner
from .plan_binding import FINE_PAGE, PlanBinding, cpu_page

ATTN_NAME = "headwise"
# queries per prefill chunk: long prompts run in pieces of this many, with memory bounded by the piece.
# Prompts up to 8K (the evals, the profiler's lengths) still run whole; ``attach_plan(chunk=2048)``
# splits them where `headwise serve` on CPU does (vLLM's default --max-num-batched-tokens there)
PREFILL_CHUNK = 8192
STATIC_INDEX_BYTES = 16 << 20  # static indices one forward keeps for its layers (chunks past it are rebuilt)
# capture(layer, q [S, Hq, D], k [S, Hkv, D], v [S, Hkv, D]) for one request's whole prompt (after RoPE)
CaptureFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class HeadwiseRuntime:
    """The plan bound to one model, plus the state one forward needs (TidalDecode, statistics)."""

    def __init__(self, plan: Plan | None, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 capture: CaptureFn | None = None, pages: int | None = None, chunk: int | None = PREFILL_CHUNK):
        if chunk is not None and chunk <= 0:
            raise ValueError(f"HeadwiseRuntime: chunk must be a positive number of queries or None, found {chunk}")
        self.plan = plan
        self.chunk = chunk  # queries per prefill chunk (None: a request's whole prompt at once)
        self.pages = pages  # read whole pages of this many tokens, as vLLM's CPU op does (None: exact)
        self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim = num_layers, num_heads, num_kv_heads, head_dim
        # the plan as one (unsharded) worker sees it: the same layer bindings the vLLM impl runs
        self.binding = PlanBinding(plan) if plan is not None else None
        self.capture = capture
        self.tidal: TidalState | None = None
        self._static_cache = IndexCache(STATIC_INDEX_BYTES)  # static indices shared by the layers of one forward
        self.kept = {"prefill": 0.0, "decode": 0.0}  # keys attended, summed over (layer, head, query)
        self.causal = {"prefill": 0.0, "decode": 0.0}  # keys dense attention would attend

    # ---------------------------------------------------------------- helpers
    def density(self) -> dict[str, float | None]:
        """Achieved density since attach (or ``reset_stats``): kept keys / causal keys."""
        return {k: (self.kept[k] / self.causal[k] if self.causal[k] else None) for k in self.kept}

    def reset_stats(self) -> None:
        self.kept = {"prefill": 0.0, "decode": 0.0}
        self.causal = {"prefill": 0.0, "decode": 0.0}

    def _kv_heads(self, device: torch.device) -> torch.Tensor:
        """``[Hq]`` the KV head each query head reads (GQA)."""
        return torch.arange(self.num_heads, device=device) // (self.num_heads // self.num_kv_heads)

    def start_forward(self) -> None:
        """Called by layer 0: per-forward caches start empty."""
        self._static_cache = IndexCache(STATIC_INDEX_BYTES)

    # ---------------------------------------------------------------- prefill
    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """One request's queries. q: ``[Tq, Hq, D]``; k, v: ``[S, Hkv, D]`` -> ``[Tq, Hq, D]``
        (written into ``out`` when given).

        Queries run ``chunk`` at a time, as the engine's chunked prefill runs them: chunk ``c`` sees
        the keys up to its own last query, only the prompt's last chunk gets the dense tail, and the
        index, the kernel's key copies and its partial sums stay the size of one chunk however long
        the prompt (the whole prompt at once would hold its index for every query block together).
        """
        tq, s = q.shape[0], k.shape[0]
        if self.capture is not None and s == tq:
            self.capture(layer, q, k, v)
        if out is None:
            out = q.new_empty(q.shape)
        offset = s - tq
        step = tq
        if self.chunk is not None and self.chunk < tq:  # whole query blocks: a split inside one would move its window
            block = self.plan.settings.block_size if self.plan is not None else 64
            step = max(block, self.chunk // block * block)
        for c0 in range(0, tq, step):
            c1 = min(tq, c0 + step)
            self._prefill_chunk(layer, q[c0:c1], k[:offset + c1], v[:offset + c1], scale, out[c0:c1],
                                total_len=s, ends_prompt=c1 == tq)
        return out

    def _prefill_chunk(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       out: torch.Tensor, total_len: int, ends_prompt: bool) -> None:
        tq, s = q.shape[0], k.shape[0]
        if self.plan is None:  # capture mode: dense attention, the model behaves as trained
            index = SparseIndex.dense(self.num_heads, tq, s - tq, device=q.device)
        else:
            st = self.plan.settings
            index = runner.prefill_index(self.binding.for_layer(layer), st, q, k, s - tq,
                                         total_len + st.planned_generation, scale, cache=self._static_cache,
                                         ends_prompt=ends_prompt)
            if self.pages:
                index = pages.page_index(index, self.pages, pages.block_merge(self.pages, index.block_m))
        causal = self.num_heads * (tq * (s - tq) + tq * (tq + 1) / 2)
        self.causal["prefill"] += causal
        self.kept["prefill"] += fast_density(index) * causal
        runner.run_prefill(q, k, v, index, scale, out=out)

    # ----------------------------------------------------------------- decode
    def decode(self, layer: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """One new token per request. q: ``[B, Hq, D]``; caches ``[B, Hkv, S, D]`` (request b's
        tokens at ``[b, :, :seq_lens[b]]``) -> ``[B, Hq, D]``."""
        b = q.shape[0]
        block_table = torch.arange(b, dtype=torch.int32, device=q.device).view(b, 1)
        seq_lens = seq_lens.to(torch.int32)
        if self.plan is None:
            selection = DecodeSelection.uniform(b, self.num_heads, DecodeMode.DENSE, device=q.device)
        else:
            st = self.plan.settings
            width = self.plan.max_tidal_top_k()
            if width and (self.tidal is None or self.tidal.max_batch < b or self.tidal.positions.device != q.device):
                self.tidal = TidalState(b, self.num_heads, width, device=q.device)
            # total length = current length + planned generation, as the vLLM backend computes it
            lb = self.binding.for_layer(layer)
            selection = runner.decode_selection(lb, st, q, k_cache, block_table, seq_lens,
                                                seq_lens + st.planned_generation, scale, self.tidal)
            if self.pages and lb.decode_on_op:  # the engine's op reads whole pages: the same superset
                selection = pages.page_round_windows(selection, seq_lens, self.pages)
        self.causal["decode"] += float(seq_lens.sum()) * self.num_heads
        if self.binding is None:
            self.kept["decode"] += float(seq_lens.sum()) * self.num_heads
        else:
            self.kept["decode"] += float(runner.decode_kept(self.binding.for_layer(layer), selection, seq_lens))
        return runner.run_decode(q, k_cache, v_cache, block_table, seq_lens, selection, scale)


# --------------------------------------------------------------------- padding
def _left_padding(attention_mask: torch.Tensor | None, batch: int, s: int) -> list[int]:
    """Leading masked keys per row, from the 4-D mask transformers built (bool, or additive float).

    The last query of a left-padded causal batch sees every real key and no pad; anything else
    (right padding, a custom mask) is not a layout the kernels' causal rule can express.
    """
    if attention_mask is None:
        return [0] * batch
    if attention_mask.dim() != 4:
        raise ValueError(f"headwise attention: expected a 4-D attention mask [B, 1, Tq, S], found shape "
                         f"{tuple(attention_mask.shape)}")
    last = attention_mask[:, 0, -1, :]  # [B, S] (a mask broadcast over the batch has B = 1)
    allowed = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    allowed = allowed.expand(batch, allowed.shape[-1])[:, -s:]
    pads = []
    for row in range(batch):
        visible = torch.nonzero(allowed[row]).flatten()
        pad = int(visible[0]) if len(visible) else s
        if len(visible) != s - pad:
            raise ValueError(
                f"headwise attention: row {row} of the attention mask hides keys after its first visible key "
                f"(expected left padding: masked keys only at the start, found {s - pad - len(visible)} masked "
                f"keys among positions {pad}..{s - 1}); use tokenizer.padding_side = 'left'")
        pads.append(pad)
    return pads


# --------------------------------------------------------- the attention function
def headwise_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query ``[B, Hq, Tq, D]``, key/value ``[B, Hkv, S, D]``
    (the whole cache after this step's update) -> (``[B, Tq, Hq, D]``, no weights)."""
    runtime: HeadwiseRuntime | None = getattr(module, "_headwise_runtime", None)
    if runtime is None:
        raise RuntimeError("headwise attention: no plan is attached to this model; call "
                           "headwise.server.plugin.hf.attach_plan(model, plan) after from_pretrained")
    if dropout:
        raise ValueError(f"headwise attention: dropout {dropout} is not supported (inference only)")
    layer = int(module.layer_idx)
    b, hq, tq, d = query.shape
    s = key.shape[2]
    scale = scaling if scaling is not None else d ** -0.5
    if layer == 0:
        runtime.start_forward()
    pads = _left_padding(attention_mask, b, s)
    out = query.new_zeros(b, tq, hq, d)
    if tq == 1 and s > 1:  # decode: one new token over the cache
        seq_lens = torch.tensor([s - p for p in pads], dtype=torch.int32, device=query.device)
        k_cache, v_cache = key, value
        if any(pads):
            # shift each row left by its padding so token j of the request sits at slot j
            shift = (torch.arange(s, device=key.device).view(1, s) + seq_lens.new_tensor(pads).view(b, 1).long()) % s
            idx = shift.view(b, 1, s, 1).expand(b, key.shape[1], s, d)
            k_cache, v_cache = torch.gather(key, 2, idx), torch.gather(value, 2, idx)
        out[:, 0] = runtime.decode(layer, query[:, :, 0], k_cache, v_cache, seq_lens, scale)
        return out, None
    for row in range(b):
        # queries before the row's first real token are padding: their output is never used
        skip = max(0, pads[row] - (s - tq))
        q_row = query[row, :, skip:].transpose(0, 1)  # [Tq', Hq, D]
        k_row = key[row, :, pads[row]:].transpose(0, 1)  # [S', Hkv, D]
        v_row = value[row, :, pads[row]:].transpose(0, 1)
        if q_row.shape[0]:
            runtime.prefill(layer, q_row, k_row, v_row, scale, out=out[row, skip:])
    return out, None


# ------------------------------------------------------------------ registration
def register() -> None:
    """Make ``attn_implementation="headwise"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, headwise_attention)
    try:  # transformers >= 4.53: without a mask function our calls would get no padding mask
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    except ImportError:  # older releases build a 4-D mask for every implementation themselves
        pass


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]


def attach_plan(model: torch.nn.Module, plan: Plan | str | Path | None, *,
                capture: CaptureFn | None = None, pages: int | str | None = "auto",
                chunk: int | None = PREFILL_CHUNK) -> HeadwiseRuntime:
    """Bind ``plan`` (a ``Plan`` or a path) to every attention layer of ``model``.

    ``plan=None`` runs dense attention through the same kernels (the profiler's capture mode).
    ``pages``: prefill reads whole pages of this many tokens, the superset of each index that
    vLLM's CPU op computes; ``"auto"`` does so where the engine would (a CPU model whose dtype and
    head size the op runs: the engine's page for this plan, ``plan_binding.cpu_page``), ``None``
    runs every index exactly (the GPU kernels' way).
    ``chunk``: a prompt's queries run this many at a time (``None``: all at once), so a 128K prompt
    builds and holds the index of one chunk at a time.
    The model must have been loaded with ``attn_implementation="headwise"`` (or switched to it).
    Raises ``PlanError`` when the plan was made for another geometry.
    """
    register()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "_attn_implementation", None) != ATTN_NAME:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTN_NAME)
        else:
            raise ValueError(f"attach_plan: the model uses attn_implementation "
                             f"{getattr(config, '_attn_implementation', None)!r}; load it with "
                             f"attn_implementation={ATTN_NAME!r}")
    if isinstance(plan, (str, Path)):
        plan = load_plan(plan)
    heads = config.num_attention_heads
    geometry = (config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads,
                getattr(config, "head_dim", None) or config.hidden_size // heads)
    if plan is not None:
        plan.check_geometry(*geometry, source=getattr(config, "_name_or_path", None) or "the model")
    if pages == "auto":
        param = next(model.parameters())
        on_op = param.device.type == "cpu" and cpu_ops.available(param.dtype, geometry[3])
        pages = (cpu_page(plan) if plan is not None else FINE_PAGE) if on_op else None
    runtime = HeadwiseRuntime(plan, *geometry, capture=capture, pages=pages, chunk=chunk)
    modules = _attention_modules(model)
    if len(modules) != geometry[0]:
        raise ValueError(f"attach_plan: found {len(modules)} attention modules with a layer_idx, expected "
                         f"{geometry[0]} (num_hidden_layers); is this a Llama-family model?")
    for m in modules:
        m._headwise_runtime = runtime
    return runtime


def load_model(path: str, dtype: str = "bfloat16", device: str = "cpu") -> torch.nn.Module:
    """``AutoModelForCausalLM`` with the headwise attention, in eval mode on ``device``.

    transformers 4.56 renamed ``torch_dtype`` to ``dtype``; older 4.5x releases get the old name.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=ATTN_NAME,
                                                 **{key: getattr(torch, dtype)})
    return model.to(device).eval()


def detach_plan(model: torch.nn.Module) -> None:
    for m in _attention_modules(model):
        m.__dict__.pop("_headwise_runtime", None)


register()
