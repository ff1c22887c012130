"""How ``headwise profile`` turns its measurements into a plan: the prefill MILP per head under the
time (or density) budget at every calibration length, the decode choice (``--decode optimize`` or a
rule), the plan's provenance, and validation with the eval suite (found through the
``headwise.plan_validators`` entry points, so no server module imports ``headwise.evals``).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from .profile_measure import Measurements, ProfileConfig, log, measure


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
            log("note: --objective output: no decode output quality was measured; decode is judged by kept mass")
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
    log(f"decode MILP: {choice.status} in {time.monotonic() - t0:.1f}s; kept decode mass {kept:.4f}; decode "
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
    from headwise.patterns.profile_decode_rules import choose_select_layers, decode_for, default_select_layers

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
            log(f"note: length {n} is below dense_below={dense_below}: it runs dense (time and density 1.0), "
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
    log(f"MILP: {choice.status} in {time.monotonic() - t0:.1f}s; {cfg.objective} {choice.kept_mass:.4f}; "
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
        log(f"TidalDecode: selection layers {select} keep {decode_mass:.4f} of the answer rows' mass "
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
        log(f"TidalDecode: {dense_reuse} (layer, head) pairs decode densely: reusing the pick would keep "
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
