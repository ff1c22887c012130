"""Compact plan forms: expanding them into a full (layer, head) table, and compressing back.

A plan file may say things once: a ``default`` for every head, per-layer entries keyed by a layer
(``"3"``), a range (``"0-1"``, inclusive) or a list of both (``"0,2,5-7"``), each with one spec for
all heads of the layer and/or ``heads`` (a list with one entry per head, or an object of per-head
overrides keyed the same way). Later entries override earlier ones, so write ranges first.
Each table cell remembers the JSON path it came from, so later checks can point at the file.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .plan_errors import PlanError, PlanIssue, json_path


def parse_selector(key: str, limit: int, path: list[str | int], what: str) -> list[int]:
    """``"3"``, ``"0-1"`` or ``"0,2,5-7"`` -> sorted ids, each in ``[0, limit)``."""
    ids: set[int] = set()
    expected = f"a {what} number in 0..{limit - 1}, a range like \"0-{min(1, limit - 1)}\" or a comma list of those"
    for part in str(key).split(","):
        part = part.strip()
        lo_hi = part.split("-")
        if not all(x.strip().isdigit() for x in lo_hi) or len(lo_hi) > 2:
            raise PlanError(PlanIssue(json_path(path + [key]), expected, f"the key {key!r}"))
        lo, hi = int(lo_hi[0]), int(lo_hi[-1])
        if lo > hi or hi >= limit:
            raise PlanError(PlanIssue(json_path(path + [key]), f"{what}s within 0..{limit - 1} (the plan's model has "
                                      f"{limit} {what}s), low end first", f"the key {key!r}"))
        ids.update(range(lo, hi + 1))
    return sorted(ids)


def _entries(container: Any, count: int, path: list[str | int], what: str):
    """Yield ``(ids, entry, entry_path)`` for a list (one entry per id) or an object of overrides."""
    if container is None:
        return
    if isinstance(container, list):
        if len(container) != count:
            raise PlanError(PlanIssue(json_path(path), f"a list of {count} {what} entries (one per {what}), or an "
                                      "object of overrides", f"a list of {len(container)}"))
        for i, entry in enumerate(container):
            yield [i], entry, path + [i]
        return
    for key, entry in container.items():
        yield parse_selector(key, count, path, what), entry, path + [key]


def expand(default: Any, layers: Any, num_layers: int, num_heads: int, base_prefill: Any, base_decode: Any):
    """Full tables ``prefill[l][h]``, ``decode[l][h]`` and the JSON path each cell came from."""
    pre = default.prefill or base_prefill
    dec = default.decode or base_decode
    pre_src = "$.default.prefill" if default.prefill else "(built-in default: dense)"
    dec_src = "$.default.decode" if default.decode else "(built-in default: dense)"
    prefill = [[pre] * num_heads for _ in range(num_layers)]
    decode = [[dec] * num_heads for _ in range(num_layers)]
    origin_p = [[pre_src] * num_heads for _ in range(num_layers)]
    origin_d = [[dec_src] * num_heads for _ in range(num_layers)]

    def put(ls: list[int], hs: list[int], spec: Any, path: list[str | int]) -> None:
        for which, table, origin in (("prefill", prefill, origin_p), ("decode", decode, origin_d)):
            value = getattr(spec, which)
            if value is None:
                continue
            src = json_path(path + [which])
            for layer in ls:
                for h in hs:
                    table[layer][h] = value
                    origin[layer][h] = src

    all_heads = list(range(num_heads))
    for ls, entry, lpath in _entries(layers, num_layers, ["layers"], "layer"):
        put(ls, all_heads, entry, lpath)
        for hs, head_entry, hpath in _entries(entry.heads, num_heads, lpath + ["heads"], "head"):
            put(ls, hs, head_entry, hpath)
    return prefill, decode, origin_p, origin_d


def compress(prefill: list[list[Any]], decode: list[list[Any]]) -> tuple[dict, dict]:
    """The shortest-ish compact form of full tables: ``(default, layers)`` as plain dicts.

    The most common (prefill, decode) spec becomes the default; consecutive layers with the same
    row are written once as a range; a layer whose heads differ gets a per-head list.
    """
    pre_default = Counter(s for row in prefill for s in row).most_common(1)[0][0]
    dec_default = Counter(s for row in decode for s in row).most_common(1)[0][0]

    def dump(spec: Any) -> dict:
        return spec.model_dump(mode="json", exclude_none=True)

    def layer_entry(prow: list[Any], drow: list[Any]) -> dict:
        entry: dict[str, Any] = {}
        if len(set(prow)) == 1:
            if prow[0] != pre_default:
                entry["prefill"] = dump(prow[0])
        if len(set(drow)) == 1:
            if drow[0] != dec_default:
                entry["decode"] = dump(drow[0])
        if len(set(prow)) > 1 or len(set(drow)) > 1:
            heads = []
            for p, d in zip(prow, drow):
                h: dict[str, Any] = {}
                if len(set(prow)) > 1:
                    h["prefill"] = dump(p)
                if len(set(drow)) > 1:
                    h["decode"] = dump(d)
                heads.append(h)
            entry["heads"] = heads
        return entry

    layers: dict[str, Any] = {}
    l0 = 0
    n = len(prefill)
    while l0 < n:
        l1 = l0
        while l1 + 1 < n and prefill[l1 + 1] == prefill[l0] and decode[l1 + 1] == decode[l0]:
            l1 += 1
        entry = layer_entry(prefill[l0], decode[l0])
        if entry:
            layers[str(l0) if l1 == l0 else f"{l0}-{l1}"] = entry
        l0 = l1 + 1
    return {"prefill": dump(pre_default), "decode": dump(dec_default)}, layers
