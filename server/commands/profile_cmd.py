"""``headwise profile``: measure every head of a model on calibration prompts and write a Plan.

    headwise profile --model M --out PLAN.json [--lengths 2048,4096,8192] [--prompts 4]
                     [--time-budget 0.3] [--decode-time-budget 1.0] [--objective output] [--validate-cases 2]

The model runs in Hugging Face transformers with the headwise attention in capture mode: dense
attention through the headwise kernels, and each layer's q/k/v handed to ``score_layer`` as the
forward passes, so nothing is kept between layers. Calibration prompts are the retrieval tasks
of ``headwise.server.commands.tasks`` (seeds below 1,000,000; the eval suite's start there) with
the expected answer appended as the assistant's reply. Every candidate is judged per head by the
attention mass it keeps on sampled query rows (``--objective mass``; or by the error of the
attention *output* it gives there, ``output``: at one budget on SmolLM2 the mass-chosen plan scored
higher on the eval suite, ``evals/results/suite-mass.md`` vs ``suite-output.md``), and priced by its **measured** time on this device, the way
the server runs it (``profile_cost``; or its density, ``--cost density``). ``choose_patterns`` (a
MILP) picks one prefill pattern per head with the plan's attention time at most the budget times
dense at every calibration length. Decode is chosen the same way (``--decode optimize``, the
default): dense and sink + window selections scored per head on the answer rows, priced by the
measured time of one decode step (``profile_cost.measure_decode_costs``), one per head by
``patterns.profile_decode.choose_decode`` under ``--decode-time-budget``; the older rules
(``patterns.profile_decode.decode_for``: TidalDecode, matched windows, all dense) stay available.
The plan is then validated: the eval suite on held-out seeds through the transformers path,
dense vs the plan, per task and length (``--validate-cases``); a plan below its accuracy target
is written with a warning. The plan file carries its provenance (``provenance``). Progress goes
to stderr; the same code runs on a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

_TASKS = ("passkey", "kv_retrieval", "variable_tracking")
# patterns.profile_decode.DECODE_CHOICES spelled out: building the CLI's parser imports no torch
DECODE_CHOICES = ("optimize", "auto", "tidal", "matched", "dense")


@dataclass
class ProfileConfig:
    model: str | None = None
    lengths: tuple[int, ...] = (2048, 4096, 8192)  # the lengths it will serve (SmolLM2: up to 8K)
    prompts: int = 4  # per length
    density_budget: float = 0.3  # --cost density
    time_budget: tuple[float, ...] = (0.3,)  # --cost time: the plan's attention time / dense's, per length
    objective: str = "mass"  # mass: kept attention mass; output: attention-output error (measured: mass won)
    cost: str = "time"  # time: measured on this device (profile_cost); density: kept pairs
    dense_tail: int = 64  # the plan's dense_tail (its rows are dense whatever the pattern: not scored)
    validate_cases: int = 2  # eval-suite cases per task and length for validation (0: none)
    validate_tasks: tuple[str, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "fwe", "qa")
    accuracy_target: float = 0.02  # validation: the plan's mean may trail dense's by at most this
    seed: int = 0
    tasks: tuple[str, ...] = _TASKS
    sample_blocks: int = 4  # query blocks of 64 scored per prompt
    max_per_layer: int | None = 3  # distinct prefill patterns per layer (None: no limit)
    per_length: bool = False  # budget at every length instead of on the mean over lengths
    dense_below: int | None = None  # default: the shortest calibration prompt, rounded down to 64
    decode: str = "optimize"  # optimize: choose_decode (measured); auto/tidal/matched/dense: decode_for's rules
    decode_time_budget: tuple[float, ...] = (1.0,)  # optimize: decode time / all-dense's, per length
    tidal_top_k: int = 256
    select_layers: tuple[int, ...] | None = None  # default: chosen from the measured reuse mass
    selections: int = 4  # TidalDecode selection layers to place
    min_reuse_mass: float = 0.9  # a head keeping less of its answer-row mass on the reused pick decodes densely
    planned_generation: int = 256
    dtype: str = "bfloat16"
    device: str = "cpu"
    num_layers: int | None = None  # profile only the first N layers (tests); the plan still covers all
    families: tuple[str, ...] | None = None  # candidate pattern types to search (None: every family)
    costs_from: Path | None = None  # a plan whose provenance holds the candidates' measured seconds


def _log(msg: str) -> None:
    print(f"[headwise profile] {msg}", file=sys.stderr, flush=True)


def calibration_ids(tokenizer, length: int, index: int, cfg: ProfileConfig):
    """Token ids ``[1, T]`` of one calibration prompt: chat-formatted task + its answer as reply."""
    from .tasks import calibration_seed, make_task

    name = cfg.tasks[index % len(cfg.tasks)]
    seed = calibration_seed(cfg.seed, index)
    # the chat template and the reply add tokens around the task: leave room for them
    frame = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content":
                                           "The answer is 1234567."}], tokenize=False)
    overhead = len(tokenizer(frame, add_special_tokens=False).input_ids)
    task = make_task(name, tokenizer, max(64, length - overhead), seed=seed)
    text = tokenizer.apply_chat_template([{"role": "user", "content": task.prompt},
                                          {"role": "assistant", "content": f"The answer is {task.answer}."}],
                                         tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids, name


@dataclass
class Measurements:
    """Everything the model run produced; enough to re-solve without running the model again."""

    geometry: dict
    model_path: str
    scores: "ProfileScores"  # noqa: F821
    tidal: "TidalScores | None"  # noqa: F821
    prompt_tokens: dict[int, list[int]]
    seconds: float
    costs: "np.ndarray | None" = None  # noqa: F821 - [C, N] measured seconds per layer (profile_cost)
    cost_device: str | None = None
    decode_scores: "DecodeScores | None" = None  # noqa: F821 - answer-row scores of the decode candidates
    decode_costs: "DecodeCosts | None" = None  # noqa: F821 - measured seconds of one decode step per layer

    def save(self, path: Path) -> None:
        """``.npz`` with the score sums and a JSON header (candidates as plan JSON)."""
        import json

        import numpy as np

        header = {"geometry": self.geometry, "model_path": self.model_path, "lengths": self.scores.lengths,
                  "candidates": [c.model_dump(mode="json") for c in self.scores.candidates],
                  "prompt_tokens": {str(k): v for k, v in self.prompt_tokens.items()}, "seconds": self.seconds,
                  "tidal_top_k": self.tidal.top_k if self.tidal else None, "cost_device": self.cost_device}
        if self.decode_scores is not None:
            header["decode_candidates"] = [c.model_dump(mode="json") for c in self.decode_scores.candidates]
        arrays = {"mass_sum": self.scores.mass_sum, "density_sum": self.scores.density_sum,
                  "count": self.scores.count}
        if self.scores.quality_sum is not None:
            arrays["quality_sum"] = self.scores.quality_sum
        if self.costs is not None:
            arrays["costs"] = self.costs
        if self.tidal is not None:
            arrays.update(tidal_sum=self.tidal.mass_sum, tidal_count=self.tidal.count)
        if self.decode_scores is not None:
            arrays.update(decode_mass_sum=self.decode_scores.mass_sum, decode_count=self.decode_scores.count)
            if self.decode_scores.quality_sum is not None:
                arrays["decode_quality_sum"] = self.decode_scores.quality_sum
        if self.decode_costs is not None:
            arrays.update(decode_op=self.decode_costs.op, decode_op_shared=self.decode_costs.op_shared,
                          decode_kernel=self.decode_costs.kernel)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, header=np.array(json.dumps(header)), **arrays)

    @classmethod
    def load(cls, path: Path) -> "Measurements":
        import json

        import numpy as np
        from pydantic import TypeAdapter

        from headwise.patterns.plan import DecodeSpec, PrefillSpec
        from headwise.patterns.profile import ProfileScores
        from headwise.patterns.profile_decode import DecodeCosts, DecodeScores, TidalScores

        data = np.load(path)
        header = json.loads(str(data["header"]))
        adapter = TypeAdapter(PrefillSpec)
        candidates = [adapter.validate_python(c) for c in header["candidates"]]
        n_layers = data["mass_sum"].shape[0]
        scores = ProfileScores(n_layers, data["mass_sum"].shape[1], candidates, header["lengths"])
        scores.mass_sum, scores.density_sum, scores.count = data["mass_sum"], data["density_sum"], data["count"]
        scores.quality_sum = data["quality_sum"] if "quality_sum" in data else None
        tidal = None
        if "tidal_sum" in data:
            tidal = TidalScores(n_layers, header["tidal_top_k"], data["tidal_sum"].shape[2])
            tidal.mass_sum, tidal.count = data["tidal_sum"], data["tidal_count"]
        decode_scores = decode_costs = None
        if "decode_mass_sum" in data:  # measurements saved before decode was optimised have none
            dec_adapter = TypeAdapter(DecodeSpec)
            decode_scores = DecodeScores(n_layers, data["decode_mass_sum"].shape[1],
                                         [dec_adapter.validate_python(c) for c in header["decode_candidates"]],
                                         header["lengths"])
            decode_scores.mass_sum, decode_scores.count = data["decode_mass_sum"], data["decode_count"]
            decode_scores.quality_sum = data["decode_quality_sum"] if "decode_quality_sum" in data else None
        if "decode_kernel" in data:
            decode_costs = DecodeCosts(data["decode_op"], data["decode_op_shared"], data["decode_kernel"])
        return cls(header["geometry"], header["model_path"], scores, tidal,
                   {int(k): v for k, v in header["prompt_tokens"].items()}, header["seconds"],
                   data["costs"] if "costs" in data else None, header.get("cost_device"), decode_scores,
                   decode_costs)


def measure(cfg: ProfileConfig) -> Measurements:
    """Run the model on the calibration prompts and score every head (the slow part)."""
    import torch
    from transformers import AutoTokenizer

    from headwise.patterns.profile import ProfileScores, default_candidates, score_layer
    from headwise.patterns.profile_decode import DecodeScores, TidalScores, decode_candidates

    from headwise.server.plugin import hf
    from .model import read_geometry, resolve_model

    started = time.monotonic()
    path = resolve_model(cfg.model)
    geo = read_geometry(path)
    n_layers, n_heads, n_kv = geo["num_layers"], geo["num_heads"], geo["num_kv_heads"]
    scored_layers = min(n_layers, cfg.num_layers or n_layers)
    lengths = sorted(set(cfg.lengths))
    candidates = default_candidates(max(lengths))
    if cfg.families:
        candidates = [c for c in candidates if c.type in cfg.families or c.type == "dense"]
    _log(f"model {path}: {n_layers} layers x {n_heads} heads ({n_kv} KV heads); {len(candidates)} candidates; "
         f"lengths {lengths}; {cfg.prompts} prompts per length")

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = hf.load_model(path, cfg.dtype, cfg.device)
    if scored_layers < n_layers:  # tests: a truncated model scores its first layers only
        model.model.layers = model.model.layers[:scored_layers]
        model.config.num_hidden_layers = scored_layers
    scores = ProfileScores(scored_layers, n_heads, candidates, lengths)
    tidal = TidalScores(scored_layers, cfg.tidal_top_k, n_heads)
    decode_scores = DecodeScores(scored_layers, n_heads, decode_candidates(lengths), lengths)
    current = {"li": 0}

    def capture(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # q: [S, Hq, D], k, v: [S, Hkv, D] of one prompt, RoPE applied
        score = score_layer(q, k, candidates, layer_heads=n_heads, layer_kv_heads=n_kv,
                            n_blocks=cfg.sample_blocks, total_len=q.shape[0] + cfg.planned_generation,
                            v=v if cfg.objective == "output" else None, tail=cfg.dense_tail)
        scores.add(layer, current["li"], score)
        tidal.add(layer, score.sample)
        decode_scores.add(layer, current["li"], score.sample, score.values)

    hf.attach_plan(model, None, capture=capture)
    prompt_tokens: dict[int, list[int]] = {n: [] for n in lengths}
    for li, length in enumerate(lengths):
        current["li"] = li
        for p in range(cfg.prompts):
            ids, task = calibration_ids(tokenizer, length, p, cfg)
            t0 = time.monotonic()
            with torch.no_grad():
                model(ids.to(cfg.device), use_cache=False, logits_to_keep=1)
            prompt_tokens[length].append(int(ids.shape[1]))
            _log(f"length {length} prompt {p + 1}/{cfg.prompts} ({task}, {ids.shape[1]} tokens): "
                 f"{scored_layers} layers scored in {time.monotonic() - t0:.1f}s "
                 f"(elapsed {time.monotonic() - started:.0f}s)")
    costs = decode_costs = None
    if cfg.cost == "time" and cfg.costs_from is not None:
        costs = costs_from_plan(cfg.costs_from, candidates, lengths)
        decode_costs = decode_costs_from_plan(cfg.costs_from, decode_scores.candidates, lengths,
                                              required=cfg.decode == "optimize")
        _log(f"candidate timings read from {cfg.costs_from} (measured on {cfg.device} when it was made)")
    elif cfg.cost == "time":
        from .profile_cost import measure_costs, measure_decode_costs

        del model  # the timings run alone
        _log(f"timing {len(candidates)} candidates for one layer at {lengths} tokens on {cfg.device} ...")
        costs = measure_costs(candidates, n_heads, n_kv, geo["head_dim"], lengths, device=cfg.device,
                              dtype=getattr(torch, cfg.dtype), log=_log)
        decode_costs = measure_decode_costs(decode_scores.candidates, n_heads, n_kv, geo["head_dim"], lengths,
                                            device=cfg.device, dtype=getattr(torch, cfg.dtype), log=_log)
    return Measurements(geo, path, scores, tidal, prompt_tokens, round(time.monotonic() - started, 1), costs,
                        cfg.device if costs is not None else None, decode_scores, decode_costs)


def _provenance(path: Path) -> dict:
    """The ``provenance`` of the plan file ``--costs-from`` names (empty when it records none)."""
    import json

    try:
        return json.loads(Path(path).read_text()).get("provenance") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"--costs-from {path}: cannot read a plan: {exc}") from exc


def costs_from_plan(path: Path, candidates: list, lengths: list[int]):
    """``[C, N]`` seconds per candidate and length, read from a plan's ``provenance.candidate_seconds``
    (what ``headwise profile`` measured when it made that plan): re-solving with another plan's
    timings reproduces its choice without timing again, and makes the choice repeatable."""
    import numpy as np

    from headwise.patterns.profile import describe

    prov = _provenance(path)
    seconds, at = prov.get("candidate_seconds"), prov.get("lengths")
    if not seconds or at is None:
        raise ValueError(f"--costs-from {path}: its provenance has no candidate_seconds (a plan made by "
                         f"`headwise profile --cost time` has them)")
    missing = [n for n in lengths if n not in at]
    if missing:
        raise ValueError(f"--costs-from {path}: timed at lengths {at}, not at {missing}")
    out = np.zeros((len(candidates), len(lengths)))
    for ci, c in enumerate(candidates):
        row = seconds.get(describe(c))
        if row is None:
            raise ValueError(f"--costs-from {path}: no timing for candidate {describe(c)}; it timed "
                             f"{len(seconds)} candidates (narrow the search with --families)")
        out[ci] = [row[at.index(n)] for n in lengths]
    return out


def decode_costs_from_plan(path: Path, candidates: list, lengths: list[int], required: bool = True):
    """``DecodeCosts`` read from a plan's ``provenance.decode_seconds`` (what ``headwise profile``
    timed for the decode candidates when it made that plan), or None when the plan has none and
    they are not ``required`` (a decode rule needs no timing)."""
    from headwise.patterns.profile_decode import DecodeCosts

    prov = _provenance(path)
    seconds, at = prov.get("decode_seconds"), prov.get("lengths")
    if not seconds or at is None:
        if not required:
            return None
        raise ValueError(f"--costs-from {path}: its provenance has no decode_seconds (a plan made by `headwise "
                         f"profile --cost time --decode optimize` has them); time the decode candidates on this "
                         f"device (leave out --costs-from), or choose a decode rule (--decode auto)")
    return DecodeCosts.from_seconds(seconds, candidates, at, lengths, where=f"--costs-from {path}: decode_seconds")


def choose_decode_tables(meas: Measurements, cfg: ProfileConfig, dense_below: int) -> tuple[list[list], dict]:
    """``--decode optimize``: every scored head's decode spec chosen by ``choose_decode`` (unscored
    layers dense), and what it achieves for the report."""
    import numpy as np

    from headwise.patterns.profile import describe
    from headwise.patterns.profile_decode import DecodeCosts, choose_decode, decode_plan_cost

    ds = meas.decode_scores
    if ds is None:
        raise ValueError("--decode optimize: these measurements hold no decode scores (saved before decode was "
                         "optimised); re-measure, or choose a decode rule (--decode auto)")
    lengths, candidates = ds.lengths, ds.candidates
    if cfg.cost == "time":
        if meas.decode_costs is None:
            raise ValueError("--decode optimize --cost time: these measurements hold no decode timings; re-measure, "
                             "take them from a plan (--costs-from), or choose --cost density")
        costs = meas.decode_costs
    else:
        costs = DecodeCosts.from_density(candidates, lengths)
    budget = list(cfg.decode_time_budget)
    if len(budget) not in (1, len(lengths)):
        raise ValueError(f"--decode-time-budget: expected one value or one per calibration length ({len(lengths)}: "
                         f"{lengths}), found {len(budget)}")
    budget = [float(b) for b in (budget * len(lengths) if len(budget) == 1 else budget)]
    score = ds.mass()
    if cfg.objective == "output":
        if ds.quality_sum is not None:
            score = ds.quality()
        else:
            _log("note: --objective output: no decode output quality was measured; decode is judged by kept mass")
    # decode rows shorter than dense_below read every token whatever is chosen: those lengths are
    # left out of the solve, as in prefill
    live = [li for li, n in enumerate(lengths) if n >= dense_below]
    if not live:
        raise ValueError(f"every calibration length {lengths} is below dense_below={dense_below}: nothing to plan")
    sub = DecodeCosts(costs.op[live], costs.op_shared[live], costs.kernel[:, live])
    t0 = time.monotonic()
    try:
        choice = choose_decode(score[..., live], sub, [budget[li] for li in live])
    except ValueError as exc:
        raise ValueError(f"--decode-time-budget {','.join(map(str, cfg.decode_time_budget))}: {exc}") from exc
    rel = decode_plan_cost(choice.pick, costs)
    rel[[li for li in range(len(lengths)) if li not in live]] = 1.0
    li_, hi_ = np.meshgrid(np.arange(ds.num_layers), np.arange(ds.num_heads), indexing="ij")
    kept = float(ds.mass()[li_, hi_, choice.pick].mean())
    counts: dict[str, int] = {}
    for c in choice.pick.flatten():
        counts[describe(candidates[c])] = counts.get(describe(candidates[c]), 0) + 1
    _log(f"decode MILP: {choice.status} in {time.monotonic() - t0:.1f}s; kept decode mass {kept:.4f}; decode "
         f"{cfg.cost} vs dense " + ", ".join(f"{n}: {c:.3f}" for n, c in zip(lengths, rel)) + f"; {counts}")
    table = [[candidates[choice.pick[l, h]] if l < ds.num_layers else candidates[0]
              for h in range(meas.geometry["num_heads"])] for l in range(meas.geometry["num_layers"])]
    report = {
        "decode_budget": budget, "decode_candidates": [describe(c) for c in candidates],
        "decode_kept_mass": round(kept, 4), "decode_objective_value": round(choice.kept, 4),
        "decode_time_vs_dense": {str(n): round(float(c), 4) for n, c in zip(lengths, rel)},
        "decode_seconds": costs.to_seconds(candidates) if cfg.cost == "time" else None,
        "decode_patterns": counts, "decode_milp": choice.status,
    }
    return table, report


def make_plan(meas: Measurements, cfg: ProfileConfig):
    """Choose the patterns from the measurements; return ``(plan, report)``."""
    import numpy as np

    from headwise.patterns.plan import ModelGeometry, Plan, Settings
    from headwise.patterns.profile import choose_patterns, describe
    from headwise.patterns.profile_decode import choose_select_layers, decode_for, default_select_layers

    geo, scores = meas.geometry, meas.scores
    n_layers, n_heads = geo["num_layers"], geo["num_heads"]
    scored_layers = scores.num_layers
    lengths, candidates = scores.lengths, scores.candidates
    # default: sparse from the shortest prompt that was measured (rounded down to a block), so a
    # prompt like the calibration ones never falls back to dense
    shortest = min(min(v) for v in meas.prompt_tokens.values() if v) if any(meas.prompt_tokens.values()) else min(lengths)
    dense_below = (shortest // 64) * 64 if cfg.dense_below is None else cfg.dense_below
    mass, density = scores.mass(), scores.density()  # [L, H, C, N]
    objective = scores.quality() if cfg.objective == "output" else mass
    if cfg.cost == "time":
        if meas.costs is None:
            raise ValueError("--cost time: these measurements hold no timings (measured with --cost density); "
                             "re-measure, or choose --cost density")
        from .profile_cost import relative

        rel = relative(meas.costs)  # [C, N]
        cost = np.broadcast_to(rel[None, None], density.shape).copy()
        budget, per_length = list(cfg.time_budget), True
    else:
        cost, budget, per_length = density.copy(), cfg.density_budget, cfg.per_length
    # a length below dense_below runs dense whatever is chosen: no choice can change it, so it is
    # left out of the solve (and reported as dense)
    live = [li for li, n in enumerate(lengths) if n >= dense_below]
    for li, n in enumerate(lengths):
        if li not in live:
            _log(f"note: length {n} is below dense_below={dense_below}: it runs dense (time and density 1.0), "
                 f"outside the budget")
            density[..., li] = 1.0
            cost[..., li] = 1.0
    if not live:
        raise ValueError(f"every calibration length {lengths} is below dense_below={dense_below}: nothing to plan")
    if cfg.cost == "time":
        if len(budget) not in (1, len(lengths)):
            raise ValueError(f"--time-budget: expected one value or one per calibration length ({len(lengths)}: "
                             f"{lengths}), found {len(budget)}")
        budget = [float(b) for b in (budget * len(lengths) if len(budget) == 1 else budget)]
        solve_budget = [budget[li] for li in live]
    else:
        solve_budget = budget
    t0 = time.monotonic()
    allowed = None
    if cfg.families:  # a re-solve may narrow the families measured (dense stays allowed)
        ok = np.array([c.type in cfg.families or c.type == "dense" for c in candidates])
        allowed = np.broadcast_to(ok[None, None], objective.shape[:3]).copy()
    choice = choose_patterns(objective[..., live], cost[..., live], solve_budget, per_length=per_length,
                             max_per_layer=cfg.max_per_layer, allowed=allowed)
    li_, hi_ = np.meshgrid(np.arange(scored_layers), np.arange(n_heads), indexing="ij")
    chosen_mass = float(mass[li_, hi_, choice.pick].mean())
    chosen_density = [float(d) for d in density[li_, hi_, choice.pick].mean((0, 1))]
    chosen_cost = [float(c) for c in cost[li_, hi_, choice.pick].mean((0, 1))]
    _log(f"MILP: {choice.status} in {time.monotonic() - t0:.1f}s; {cfg.objective} {choice.kept_mass:.4f}; "
         f"kept mass {chosen_mass:.4f}; {cfg.cost} cost vs dense "
         + ", ".join(f"{n}: {c:.3f}" for n, c in zip(lengths, chosen_cost)) + "; density "
         + ", ".join(f"{n}: {d:.3f}" for n, d in zip(lengths, chosen_density)))

    decode_mass = None
    measured = meas.tidal is not None and scored_layers == n_layers
    reuse = meas.tidal.reuse() if measured else None  # [L, L, H]
    if cfg.decode == "optimize":
        select = []  # no TidalDecode: every head's decode is chosen by the MILP
    elif cfg.select_layers is not None:
        select = list(cfg.select_layers)
    elif cfg.decode in ("auto", "tidal") and measured:
        select, decode_mass = choose_select_layers(reuse.mean(-1), cfg.selections)
        _log(f"TidalDecode: selection layers {select} keep {decode_mass:.4f} of the answer rows' mass "
             f"(top-{meas.tidal.top_k}, mean over heads)")
    else:
        select = default_select_layers(n_layers, selections=cfg.selections)

    def reuse_ok(layer: int, head: int) -> bool:
        # the head would reuse the pick of the latest selection layer: keep it only if that keeps
        # enough of the head's own attention (query heads of different layers need not agree)
        earlier = [s for s in select if s < layer]
        if not measured or not earlier or cfg.decode != "auto":
            return True
        return bool(reuse[max(earlier), layer, head] >= cfg.min_reuse_mass)

    prefill = [[candidates[choice.pick[l, h]] if l < scored_layers else candidates[0] for h in range(n_heads)]
               for l in range(n_layers)]
    decode_report: dict = {}
    if cfg.decode == "optimize":
        decode, decode_report = choose_decode_tables(meas, cfg, dense_below)
    else:
        decode = [[decode_for(prefill[l][h], l, select, cfg.decode, reuse_ok=reuse_ok(l, h))
                   for h in range(n_heads)] for l in range(n_layers)]
    dense_reuse = sum(1 for l in range(n_layers) for h in range(n_heads)
                      if cfg.decode == "auto" and not reuse_ok(l, h) and l not in select)
    if dense_reuse:
        _log(f"TidalDecode: {dense_reuse} (layer, head) pairs decode densely: reusing the pick would keep "
             f"less than {cfg.min_reuse_mass} of their attention")
    counts: dict[str, int] = {}
    for row in prefill:
        for spec in row:
            counts[spec.type] = counts.get(spec.type, 0) + 1
    report = {
        "model": geo.get("architecture"), "model_path": meas.model_path, "lengths": lengths,
        "prompts": len(meas.prompt_tokens[lengths[0]]), "prompt_tokens": meas.prompt_tokens,
        "tasks": list(cfg.tasks), "seed": cfg.seed, "objective": cfg.objective, "cost": cfg.cost,
        "budget": budget, "objective_value": round(choice.kept_mass, 4), "kept_mass": round(chosen_mass, 4),
        "measured_density": {str(n): round(d, 4) for n, d in zip(lengths, chosen_density)},
        "attention_time_vs_dense": ({str(n): round(c, 4) for n, c in zip(lengths, chosen_cost)}
                                    if cfg.cost == "time" else None),
        "candidate_seconds": ({describe(c): [round(float(x), 5) for x in row]
                               for c, row in zip(candidates, meas.costs)} if meas.costs is not None else None),
        "cost_device": meas.cost_device, "dense_tail": cfg.dense_tail, "dense_below": dense_below,
        "families": list(cfg.families) if cfg.families else "all", "decode_rule": cfg.decode,
        "validated": bool(cfg.validate_cases),
        "patterns": counts, "select_layers": select, "tidal_top_k": cfg.tidal_top_k,
        "decode_mass": None if decode_mass is None else round(decode_mass, 4), "decode": cfg.decode,
        "dense_reuse_heads": dense_reuse, "min_reuse_mass": cfg.min_reuse_mass,
        "milp": choice.status, "candidates": [describe(c) for c in candidates], "scored_layers": scored_layers,
        "measure_seconds": meas.seconds, "dense_kept_mass": float(np.mean(mass[..., 0, :])),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **decode_report,
    }
    description = (f"profiled by `headwise profile` for {Path(meas.model_path).name} at {lengths} tokens: per head, "
                   f"the best {cfg.objective} under a {cfg.cost} budget of {budget} of dense; see provenance")
    geometry = ModelGeometry(name=Path(meas.model_path).name, **{
        k: geo[k] for k in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim")})
    settings = Settings(dense_below=dense_below, dense_tail=cfg.dense_tail, tidal_top_k=cfg.tidal_top_k,
                        planned_generation=cfg.planned_generation)
    report["headwise_version"] = _version()
    provenance = {k: v for k, v in report.items() if k not in ("candidates", "model_path")}
    provenance["model"] = Path(meas.model_path).name
    return Plan.from_tables(geometry, prefill, decode, settings, description=description,
                            provenance=provenance), report


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("headwise")
    except PackageNotFoundError:
        return "unknown"


# The eval suite joins as a validator through this entry-point group, so no server module imports it.
VALIDATOR_GROUP = "headwise.plan_validators"


def plan_validator():
    """The installed plan validator (the eval suite's ``headwise.evals.validate``), or None."""
    from importlib.metadata import entry_points

    found = sorted(entry_points(group=VALIDATOR_GROUP), key=lambda ep: ep.name)
    return found[0].load() if found else None


def validate(plan, meas: Measurements, cfg: ProfileConfig) -> dict:
    """The eval suite on held-out seeds through the transformers path: dense, then ``plan``, per task
    and calibration length (``--validate-cases`` cases each). Returns scores and the verdict."""
    return plan_validator().validate(plan, meas.model_path, list(meas.scores.lengths), list(cfg.validate_tasks),
                                     cfg.validate_cases, cfg.dtype, cfg.accuracy_target)


def run_profile(cfg: ProfileConfig):
    """Measure ``cfg.model`` and choose its plan: ``(plan, report)``."""
    return make_plan(measure(cfg), cfg)


# ------------------------------------------------------------------------------- CLI
def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1024,2048, found {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.4,0.25, found {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    d = ProfileConfig()
    p = subparsers.add_parser("profile", help="measure each head on calibration prompts and write a Plan (JSON)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint dir or hub id (default: the embedded SmolLM2)")
    p.add_argument("--out", required=True, type=Path, help="plan file to write (atomically)")
    p.add_argument("--lengths", type=_int_list, default=d.lengths,
                   help="calibration lengths in tokens: the lengths the plan will serve (default 2048,4096,8192)")
    p.add_argument("--prompts", type=int, default=d.prompts, help="calibration prompts per length (default 4)")
    p.add_argument("--time-budget", type=_float_list, default=d.time_budget,
                   help="--cost time: the plan's prefill attention time as a fraction of dense's, held at every "
                        "calibration length: one value, or one per length (e.g. 0.4,0.25; default "
                        f"{','.join(map(str, d.time_budget))})")
    p.add_argument("--density-budget", type=float, default=d.density_budget,
                   help=f"--cost density: mean prefill density over heads and lengths (default {d.density_budget})")
    p.add_argument("--cost", choices=("time", "density"), default=d.cost,
                   help="price of a candidate: its measured time on --device, the way the server runs it "
                        "(default), or its density")
    p.add_argument("--objective", choices=("mass", "output"), default=d.objective,
                   help="what a head keeps: its attention mass (default), or its attention output (1 - relative "
                        "error on sampled rows; measured on SmolLM2 at one budget: less accurate end to end)")
    p.add_argument("--dense-tail", type=int, default=d.dense_tail,
                   help=f"the plan's dense_tail: the prompt's last queries attend densely (default {d.dense_tail})")
    p.add_argument("--validate-cases", type=int, default=d.validate_cases,
                   help=f"eval-suite cases per task and length to validate the plan with, dense vs plan through "
                        f"transformers (default {d.validate_cases}; 0: no validation)")
    p.add_argument("--validate-tasks", default=",".join(d.validate_tasks), help="eval tasks for the validation")
    p.add_argument("--accuracy-target", type=float, default=d.accuracy_target,
                   help=f"validation: the plan's mean score may trail dense's by this much (default {d.accuracy_target})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the calibration prompts")
    p.add_argument("--tasks", default=",".join(d.tasks), help=f"calibration tasks (default {','.join(d.tasks)})")
    p.add_argument("--sample-blocks", type=int, default=d.sample_blocks, help="64-query blocks scored per prompt")
    p.add_argument("--max-per-layer", type=int, default=d.max_per_layer,
                   help="distinct prefill patterns per layer (0: no limit; default 3)")
    p.add_argument("--per-length", action="store_true", help="hold the budget at every length, not on the mean")
    p.add_argument("--dense-below", type=int, default=None, help="plan's dense_below (default: shortest calibration prompt, rounded down to 64)")
    p.add_argument("--decode", choices=DECODE_CHOICES, default=d.decode,
                   help="how each head's decode pattern is chosen: optimize = per head, dense or a sink+window "
                        "selection, whichever keeps the most of the answer rows' attention under "
                        "--decode-time-budget, priced by measured decode time (default); the rules: auto = "
                        "TidalDecode, dense for heads measured to lose on reuse; tidal = TidalDecode everywhere; "
                        "matched = window prefill heads keep their span, others dense; dense = every head dense")
    p.add_argument("--decode-time-budget", type=_float_list, default=d.decode_time_budget,
                   help="--decode optimize: the plan's decode time as a fraction of all-dense decode's, held at "
                        "every calibration length: one value, or one per length (default "
                        f"{','.join(map(str, d.decode_time_budget))}: all dense wherever dense decode is the "
                        "fastest, as on CPU; with --cost density, the share of cached tokens read)")
    p.add_argument("--tidal-top-k", type=int, default=d.tidal_top_k, help="TidalDecode tokens per head (default 256)")
    p.add_argument("--select-layers", type=_int_list, default=None,
                   help="TidalDecode selection layers (default: placed by the measured reuse mass)")
    p.add_argument("--selections", type=int, default=d.selections, help="TidalDecode selection layers to place (default 4)")
    p.add_argument("--planned-generation", type=int, default=d.planned_generation, help="tokens assumed generated (MoA spans)")
    p.add_argument("--dtype", default=d.dtype, choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default=d.device, help="torch device (cpu, cuda)")
    p.add_argument("--min-reuse-mass", type=float, default=d.min_reuse_mass,
                   help="decode: a head keeping less of its attention on the reused TidalDecode pick stays dense "
                        "(default 0.9; 0 disables)")
    p.add_argument("--families", default=None,
                   help="search only these prefill families (comma list, e.g. a_shape,strided; dense is always "
                        "a candidate): a family measured to cost more than the budget on this device can be "
                        "left out to shorten the run")
    p.add_argument("--costs-from", type=Path, default=None,
                   help="take the candidates' measured seconds from this plan's provenance instead of timing "
                        "them (reproduces a shipped plan's choice; its lengths and candidates must cover these)")
    p.add_argument("--save-scores", type=Path, default=None, help="also write the raw measurements (.npz)")
    p.add_argument("--from-scores", type=Path, default=None,
                   help="skip the model run: re-solve from measurements saved by --save-scores")
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args: argparse.Namespace) -> int:
    from headwise.patterns.plan_errors import PlanError

    from .model import ModelError
    from .tasks import TASKS

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        print(f"headwise profile: --tasks {args.tasks!r}: expected names from {sorted(TASKS)}", file=sys.stderr)
        return 2
    if not 0 < args.density_budget <= 1:
        print(f"headwise profile: --density-budget must be in (0, 1], found {args.density_budget}", file=sys.stderr)
        return 2
    if not all(b > 0 for b in args.time_budget):
        print(f"headwise profile: --time-budget must be > 0, found {args.time_budget}", file=sys.stderr)
        return 2
    if not all(b > 0 for b in args.decode_time_budget):
        print(f"headwise profile: --decode-time-budget: expected values > 0 (decode time as a fraction of dense "
              f"decode's), found {','.join(map(str, args.decode_time_budget))}", file=sys.stderr)
        return 2
    vtasks = tuple(t.strip() for t in args.validate_tasks.split(",") if t.strip())
    if args.validate_cases:
        validator = plan_validator()
        if validator is None:
            print("headwise profile: --validate-cases needs the eval suite (headwise.evals), which is not installed; "
                  "pass --validate-cases 0 to write the plan unvalidated", file=sys.stderr)
            return 2
        if not vtasks or any(t not in validator.TASK_NAMES for t in vtasks):
            print(f"headwise profile: --validate-tasks {args.validate_tasks!r}: expected names from "
                  f"{list(validator.TASK_NAMES)}", file=sys.stderr)
            return 2
    from headwise.patterns.profile import default_candidates

    known = {c.type for c in default_candidates(8192)}
    fams = [f.strip() for f in (args.families or "").split(",") if f.strip()]
    if any(f not in known for f in fams):
        print(f"headwise profile: --families {args.families!r}: expected names from {sorted(known)}", file=sys.stderr)
        return 2
    if args.validate_cases < 0 or args.dense_tail < 0:
        print("headwise profile: --validate-cases and --dense-tail must be >= 0", file=sys.stderr)
        return 2
    if args.prompts < 1:
        print(f"headwise profile: --prompts must be at least 1, found {args.prompts}", file=sys.stderr)
        return 2
    cfg = ProfileConfig(model=args.model, lengths=args.lengths, prompts=args.prompts,
                        density_budget=args.density_budget, seed=args.seed, tasks=tasks,
                        sample_blocks=args.sample_blocks, max_per_layer=args.max_per_layer or None,
                        per_length=args.per_length, dense_below=args.dense_below, decode=args.decode,
                        tidal_top_k=args.tidal_top_k, select_layers=args.select_layers, selections=args.selections,
                        min_reuse_mass=args.min_reuse_mass, time_budget=args.time_budget, cost=args.cost,
                        decode_time_budget=args.decode_time_budget,
                        objective=args.objective, dense_tail=args.dense_tail, validate_cases=args.validate_cases,
                        validate_tasks=vtasks, accuracy_target=args.accuracy_target,
                        families=tuple(f.strip() for f in args.families.split(",") if f.strip())
                        if args.families else None,
                        planned_generation=args.planned_generation, dtype=args.dtype, device=args.device,
                        costs_from=args.costs_from)
    try:
        if args.from_scores:
            meas = Measurements.load(args.from_scores)
            if meas.tidal is not None and meas.tidal.top_k != cfg.tidal_top_k:
                _log(f"note: the saved TidalDecode scores were measured at top-{meas.tidal.top_k}; "
                     f"the plan uses top-{cfg.tidal_top_k}")
            optimize = cfg.decode == "optimize" and meas.decode_scores is not None
            if cfg.cost == "time" and cfg.costs_from is not None:
                import dataclasses

                meas = dataclasses.replace(meas, costs=costs_from_plan(cfg.costs_from, meas.scores.candidates,
                                                                       meas.scores.lengths), cost_device=cfg.device)
                if meas.decode_scores is not None:
                    meas = dataclasses.replace(meas, decode_costs=decode_costs_from_plan(
                        cfg.costs_from, meas.decode_scores.candidates, meas.scores.lengths, required=optimize))
            elif cfg.cost == "time" and (meas.costs is None or (optimize and meas.decode_costs is None)):
                # scored without timings: time the candidates now
                import dataclasses

                import torch

                from .profile_cost import measure_costs, measure_decode_costs

                g = meas.geometry
                if meas.costs is None:
                    _log(f"timing {len(meas.scores.candidates)} candidates at {meas.scores.lengths} tokens on "
                         f"{cfg.device}")
                    meas = dataclasses.replace(meas, costs=measure_costs(
                        meas.scores.candidates, g["num_heads"], g["num_kv_heads"], g["head_dim"],
                        meas.scores.lengths, device=cfg.device, dtype=getattr(torch, cfg.dtype), log=_log),
                        cost_device=cfg.device)
                if optimize and meas.decode_costs is None:
                    meas = dataclasses.replace(meas, decode_costs=measure_decode_costs(
                        meas.decode_scores.candidates, g["num_heads"], g["num_kv_heads"], g["head_dim"],
                        meas.scores.lengths, device=cfg.device, dtype=getattr(torch, cfg.dtype), log=_log))
        else:
            meas = measure(cfg)
        if args.save_scores:
            meas.save(args.save_scores)
        plan, report = make_plan(meas, cfg)
        if cfg.validate_cases:
            _log(f"validating: {len(cfg.validate_tasks)} eval tasks x {cfg.validate_cases} cases x "
                 f"{len(meas.scores.lengths)} lengths, dense vs the plan (transformers)")
            v = validate(plan, meas, cfg)
            plan.provenance["validation"] = v
            if not v["passed"]:
                _log(f"WARNING: the plan misses its accuracy target: its mean trails dense by "
                     f"{v['mean_below_dense']} (target {cfg.accuracy_target}); written anyway, check it with "
                     f"`headwise eval` before serving it")
    except (ModelError, PlanError, ValueError, OSError) as exc:
        print(f"headwise profile: {exc}", file=sys.stderr)
        return 1
    plan.save(args.out)
    _log(f"wrote {args.out}: patterns {report['patterns']}; measured density {report['measured_density']}; "
         f"kept mass {report['kept_mass']}; measured in {report['measure_seconds']}s")
    print(args.out)
    return 0
