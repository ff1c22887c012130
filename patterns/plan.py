"""The Plan: what every (layer, query head) of a model does in prefill and in decode.

On disk a Plan is JSON (schema: ``Plan.json_schema()``, ``configs/plan.schema.json``)::

    {"format_version": 1,
     "model": {"architecture": "LlamaForCausalLM", "num_layers": 30, "num_heads": 9,
               "num_kv_heads": 3, "head_dim": 64},
     "settings": {"dense_below": 1024},
     "default": {"prefill": {"type": "a_shape", "sink": 64, "window": 512},
                 "decode": {"type": "window", "sink": 64, "window": 512}},
     "layers": {"0-1": {"prefill": {"type": "dense"}, "decode": {"type": "dense"}},
                "5": {"heads": {"2": {"prefill": {"type": "vertical_slash", "vertical": 500, "slash": 200}}}}}}

Compact forms (see ``plan_expand``) are expanded when the plan is validated; every problem is a
``PlanError`` naming the file, the JSON path, what was expected and what was found.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, model_validator

from . import families
from .a_shape import AShape
from .base import DensityContext
from .block_sparse import BlockSparse
from .dense import Dense
from .elastic_window import ElasticWindow
from .hierarchical import Hierarchical
from .page_topk import PageTopK
from .plan_errors import PlanError, PlanIssue, from_validation, invalid
from .plan_expand import compress, expand
from .strided import Strided
from .tidal import Tidal
from .vertical_slash import VerticalSlash
from .window import Window

PrefillSpec = Annotated[
    Union[Dense, AShape, VerticalSlash, BlockSparse, Strided, ElasticWindow, Hierarchical],
    Field(discriminator="type"),
]
DecodeSpec = Annotated[Union[Dense, Window, ElasticWindow, Tidal, PageTopK, Strided, Hierarchical],
                       Field(discriminator="type")]

FORMAT_VERSION = 1

# Upper bounds on a plan's geometry, checked before anything is sized by it (the plan expands to
# layers x heads tables): far above any Llama-family model (Llama 3.1 405B: 126 layers x 128 heads,
# head_dim 128), low enough that a plan declaring 10^9 layers is refused at once.
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_CELLS = 1 << 18  # layers x query heads
MAX_SUMMARY_LENGTH = 1 << 40  # Plan.summary lengths; densities are closed forms, this only keeps sums sane
SUMMARY_CACHE = 64  # summaries kept per plan (least recently used dropped)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelGeometry(_Strict):
    """The model a plan was made for; checked against the served model at start-up."""

    name: str | None = Field(None, description="model id or path, informational")
    architecture: str = Field(description="Hugging Face architecture, e.g. LlamaForCausalLM")
    num_layers: int = Field(ge=1, le=MAX_LAYERS)
    num_heads: int = Field(ge=1, le=MAX_HEADS,
                           description="query heads per layer (global, before tensor parallelism)")
    num_kv_heads: int = Field(ge=1, le=MAX_HEADS)
    head_dim: int = Field(ge=1, le=MAX_HEAD_DIM)

    @model_validator(mode="after")
    def _gqa(self) -> "ModelGeometry":
        if self.num_layers * self.num_heads > MAX_CELLS:
            raise invalid(f"at most {MAX_CELLS} (layer, head) cells in all",
                          f"{self.num_layers} layers x {self.num_heads} heads = {self.num_layers * self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise invalid("num_heads a multiple of num_kv_heads", f"{self.num_heads} query heads, "
                          f"{self.num_kv_heads} KV heads")
        return self


class Settings(_Strict):
    block_size: int = Field(64, ge=16, le=256, multiple_of=16, description="queries per prefill index block")
    dense_below: int = Field(1024, ge=0, description="sequences shorter than this attend densely")
    dense_tail: int = Field(0, ge=0, description=(
        "the prompt's last queries attend densely in every layer (the question at the end of a long "
        "prompt sees all of it; in a chunked prefill, the last queries of the chunk that ends the prompt); "
        "0 = off"))
    tidal_top_k: int = Field(256, ge=1, description="TidalDecode tokens per head when a tidal spec sets none")
    planned_generation: int = Field(256, ge=0, description="new tokens assumed after the prompt (MoA spans)")


class HeadSpec(_Strict):
    """A prefill and/or a decode pattern; a missing one falls back to the enclosing level."""

    prefill: PrefillSpec | None = None
    decode: DecodeSpec | None = None


class LayerSpec(HeadSpec):
    heads: list[HeadSpec] | dict[str, HeadSpec] | None = Field(
        None, description="one entry per head, or overrides keyed by head (\"2\", \"0-3\")")


@dataclass(frozen=True)
class LayerSummary:
    layer: int
    prefill: str  # e.g. "vertical_slash x6, a_shape x3"
    decode: str
    prefill_density: float  # expected fraction of causal (query, key) pairs at the length asked
    decode_density: float  # expected fraction of cached tokens one decode step reads


def _with_dense_tail(density: float, length: int, tail: int, block_m: int) -> float:
    """``density`` with the blocks holding the last ``tail`` queries made dense (the rest of the
    prompt assumed to keep ``density``): the tail's share of causal pairs is kept whole."""
    if tail <= 0 or length <= 0:
        return density
    start = max(0, (length - tail) // block_m * block_m)  # first query of the first tail block
    share = 1.0 - start * (start + 1) / (length * (length + 1))
    return density * (1.0 - share) + share


class Plan(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    description: str | None = None
    provenance: dict[str, Any] | None = Field(None, description=(
        "how the plan was made (written by `headwise profile`: model, calibration lengths and seeds, budget, "
        "measured costs, validation scores, headwise version); informational"))
    model: ModelGeometry
    settings: Settings = Field(default_factory=Settings)
    default: HeadSpec = Field(default_factory=HeadSpec)
    layers: list[LayerSpec] | dict[str, LayerSpec] = Field(
        default_factory=dict, description="one entry per layer, or overrides keyed by layer (\"3\", \"0-1\")")

    _prefill: list[list[Any]] = PrivateAttr(default_factory=list)
    _decode: list[list[Any]] = PrivateAttr(default_factory=list)
    _origin_decode: list[list[str]] = PrivateAttr(default_factory=list)
    _source: str | None = PrivateAttr(default=None)
    _summaries: "OrderedDict[int, tuple[LayerSummary, ...]]" = PrivateAttr(default_factory=OrderedDict)

    @model_validator(mode="after")
    def _expand(self, info: ValidationInfo) -> "Plan":
        m = self.model
        self._prefill, self._decode, _, self._origin_decode = expand(
            self.default, self.layers, m.num_layers, m.num_heads, Dense(), Dense())
        self._check_tidal_order()
        if info.context and info.context.get("source"):
            self._source = str(info.context["source"])
        return self

    def _check_tidal_order(self) -> None:
        """A ``reuse`` layer reads what a ``select`` layer wrote earlier in the same step."""
        for h in range(self.model.num_heads):
            selected = False
            for layer in range(self.model.num_layers):
                spec = self._decode[layer][h]
                if isinstance(spec, Tidal):
                    if spec.role == "select":
                        selected = True
                    elif not selected:
                        raise PlanError(PlanIssue(
                            self._origin_decode[layer][h] + ".role",
                            f"a tidal 'select' layer before the first 'reuse' layer of head {h}",
                            f"'reuse' at layer {layer} with no earlier 'select'"))

    # ------------------------------------------------------------- access
    @property
    def source(self) -> str | None:
        """The file this plan was loaded from, if any."""
        return self._source

    def _cell(self, table: list[list[Any]], layer: int, head: int) -> Any:
        m = self.model
        if not (0 <= layer < m.num_layers and 0 <= head < m.num_heads):
            raise IndexError(f"plan has {m.num_layers} layers x {m.num_heads} heads; asked for layer {layer}, head {head}")
        return table[layer][head]

    def prefill(self, layer: int, head: int) -> Any:
        """The prefill spec of one (layer, global query head)."""
        return self._cell(self._prefill, layer, head)

    def decode(self, layer: int, head: int) -> Any:
        """The decode spec of one (layer, global query head)."""
        return self._cell(self._decode, layer, head)

    def layer_prefill(self, layer: int) -> list[Any]:
        return list(self._prefill[layer])

    def layer_decode(self, layer: int) -> list[Any]:
        return list(self._decode[layer])

    def max_tidal_top_k(self) -> int:
        """Width a ``TidalState`` buffer needs for this plan (0 if no tidal layer)."""
        ks = [s.top_k or self.settings.tidal_top_k for row in self._decode for s in row if isinstance(s, Tidal)]
        return max(ks, default=0)

    # ------------------------------------------------------------ checking
    def check_geometry(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                       source: str = "the model") -> None:
        """Raise ``PlanError`` unless the plan was made for this geometry (global head counts)."""
        issues = []
        for field, have in (("num_layers", num_layers), ("num_heads", num_heads),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            mine = getattr(self.model, field)
            if mine != have:
                issues.append(PlanIssue(f"$.model.{field}", f"{have} ({field} of {source})",
                                        f"{mine}: this plan was made for another model"))
        if issues:
            raise PlanError(issues, file=self._source)

    # ------------------------------------------------------------ densities
    def density_context(self) -> DensityContext:
        s, m = self.settings, self.model
        return DensityContext(planned_generation=s.planned_generation, tidal_top_k=s.tidal_top_k,
                              num_layer_heads=m.num_heads, num_layer_kv_heads=m.num_kv_heads, block_m=s.block_size)

    def summary(self, length: int) -> list[LayerSummary]:
        """Per layer: the patterns its heads use and the expected densities at ``length`` tokens.

        Costs O(layers x heads) whatever ``length`` is (every density is a closed form or a bounded
        sample); the last ``SUMMARY_CACHE`` lengths asked are kept.
        """
        length = int(length)
        if not 0 <= length <= MAX_SUMMARY_LENGTH:
            raise ValueError(f"length {length}: expected 0..{MAX_SUMMARY_LENGTH} tokens")
        rows = self._summaries.get(length)
        if rows is None:
            rows = tuple(self._summary(length))
            self._summaries[length] = rows
            while len(self._summaries) > SUMMARY_CACHE:
                self._summaries.popitem(last=False)
        else:
            self._summaries.move_to_end(length)
        return list(rows)

    def _summary(self, length: int) -> list[LayerSummary]:
        ctx = self.density_context()
        dense = length < self.settings.dense_below
        # a tidal 'reuse' layer reads as many positions as the last 'select' layer of its head chose
        picked = [self.settings.tidal_top_k] * self.model.num_heads
        rows = []
        for layer in range(self.model.num_layers):
            pre, dec = self._prefill[layer], self._decode[layer]
            dec_eff = []
            for h, s in enumerate(dec):
                if isinstance(s, Tidal):
                    if s.role == "select":
                        picked[h] = s.top_k or self.settings.tidal_top_k
                    else:
                        s = Tidal(role="reuse", top_k=picked[h])
                dec_eff.append(s)
            pd = 1.0 if dense else sum(_prefill_density(s, length, ctx) for s in pre) / len(pre)
            pd = _with_dense_tail(pd, length, self.settings.dense_tail, self.settings.block_size)
            dd = 1.0 if dense else sum(_decode_density(s, length, ctx) for s in dec_eff) / len(dec)
            rows.append(LayerSummary(layer, _describe(pre), _describe(dec), pd, dd))
        return rows

    def expected_density(self, length: int) -> float:
        """Expected prefill density over every (layer, head) at a ``length``-token prompt."""
        rows = self.summary(length)
        return sum(r.prefill_density for r in rows) / len(rows)

    def expected_decode_density(self, length: int) -> float:
        rows = self.summary(length)
        return sum(r.decode_density for r in rows) / len(rows)

    # ------------------------------------------------------------- disk
    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temp file in the same folder, then ``os.replace``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def json_schema(cls) -> dict:
        return cls.model_json_schema()

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> "Plan":
        """Validate a parsed JSON document; raise ``PlanError`` naming ``source``."""
        if not isinstance(data, dict):
            raise PlanError(PlanIssue("$", "a JSON object with 'model' and the patterns",
                                      f"a JSON {type(data).__name__}"), file=source)
        try:
            return cls.model_validate(data, context={"source": source})
        except ValidationError as exc:
            raise from_validation(exc, data, file=source) from None
        except PlanError as exc:
            raise exc.with_file(source) if source else exc

    @classmethod
    def from_tables(cls, model: ModelGeometry, prefill: list[list[Any]], decode: list[list[Any]],
                    settings: Settings | None = None, description: str | None = None,
                    provenance: dict | None = None) -> "Plan":
        """A plan from full ``[layer][head]`` tables (what a profiler produces), stored compactly."""
        default, layers = compress(prefill, decode)
        data = {"model": model.model_dump(mode="json", exclude_none=True),
                "settings": (settings or Settings()).model_dump(mode="json"),
                "default": default, "layers": layers}
        if description:
            data["description"] = description
        if provenance:
            data["provenance"] = provenance
        return cls.from_dict(data)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan file; every failure is a ``PlanError`` that names the file."""
    name = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise PlanError(PlanIssue("$", "a plan file", "no such file"), file=name) from None
    except IsADirectoryError:
        raise PlanError(PlanIssue("$", "a plan file", "a directory"), file=name) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(PlanIssue("$", "a readable UTF-8 JSON file", f"{type(exc).__name__}: {exc}"), file=name) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(PlanIssue("$", "valid JSON", f"{exc.msg} at line {exc.lineno} column {exc.colno}"),
                        file=name) from None
    return Plan.from_dict(data, source=name)


@functools.lru_cache(maxsize=4096)
def _prefill_density(spec: Any, length: int, ctx: DensityContext) -> float:
    return families.PREFILL[spec.type].expected_density(spec, length, ctx)


@functools.lru_cache(maxsize=4096)
def _decode_density(spec: Any, length: int, ctx: DensityContext) -> float:
    return families.DECODE[spec.type].expected_decode_density(spec, length, ctx)


def _describe(specs: list[Any]) -> str:
    """``"vertical_slash x6, a_shape x3"``: pattern types of a layer's heads, most common first."""
    counts: dict[str, int] = {}
    for s in specs:
        name = f"tidal {s.role}" if isinstance(s, Tidal) else s.type
        counts[name] = counts.get(name, 0) + 1
    parts = sorted(counts.items(), key=lambda kv: -kv[1])
    return ", ".join(t if n == len(specs) else f"{t} x{n}" for t, n in parts)
