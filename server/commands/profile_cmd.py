"""``headwise profile``: measure every head of a model on calibration prompts and write a Plan.

    headwise profile --model M --out PLAN.json [--lengths 2048,4096,8192] [--prompts 4]
                     [--time-budget 0.3] [--decode-time-budget 1.0] [--objective output] [--validate-cases 2]

The model runs in Hugging Face transformers with the headwise attention in capture mode: dense
attention through the headwise kernels, and each layer's q/k/v handed to ``score_layer`` as the
forward passes, so nothing is kept between layers. Prompts longer than ``hf.PREFILL_CHUNK`` (8K)
run and are scored in chunks of it, each candidate's index built per chunk as chunked prefill
builds it, so a 32K-128K profile holds one chunk's indices and sampled rows at a time (its peak
memory per layer: ``bench/hf_memory.py --profiler``). Calibration prompts are the retrieval tasks
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
(``patterns.profile_decode_rules.decode_for``: TidalDecode, matched windows, all dense) stay available.
The plan is then validated: the eval suite on held-out seeds through the transformers path,
dense vs the plan, per task and length (``--validate-cases``); a plan below its accuracy target
is written with a warning. The plan file carries its provenance (``provenance``). Progress goes
to stderr; the same code runs on a GPU (``--device cuda``).

This module is the command line; the measuring is in ``profile_measure`` (configuration,
calibration prompts, the model run, ``Measurements``), the timing in ``profile_cost``, and the
choosing, provenance and validation in ``profile_plan``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .profile_measure import Measurements, ProfileConfig, costs_from_plan, decode_costs_from_plan, log, measure
from .profile_plan import make_plan, plan_validator, validate

# patterns.profile_decode.DECODE_CHOICES spelled out: building the CLI's parser imports no torch
DECODE_CHOICES = ("optimize", "auto", "tidal", "matched", "dense")


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
                log(f"note: the saved TidalDecode scores were measured at top-{meas.tidal.top_k}; "
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
                    log(f"timing {len(meas.scores.candidates)} candidates at {meas.scores.lengths} tokens on "
                         f"{cfg.device}")
                    meas = dataclasses.replace(meas, costs=measure_costs(
                        meas.scores.candidates, g["num_heads"], g["num_kv_heads"], g["head_dim"],
                        meas.scores.lengths, device=cfg.device, dtype=getattr(torch, cfg.dtype), log=log),
                        cost_device=cfg.device)
                if optimize and meas.decode_costs is None:
                    meas = dataclasses.replace(meas, decode_costs=measure_decode_costs(
                        meas.decode_scores.candidates, g["num_heads"], g["num_kv_heads"], g["head_dim"],
                        meas.scores.lengths, device=cfg.device, dtype=getattr(torch, cfg.dtype), log=log))
        else:
            meas = measure(cfg)
        if args.save_scores:
            meas.save(args.save_scores)
        plan, report = make_plan(meas, cfg)
        if cfg.validate_cases:
            log(f"validating: {len(cfg.validate_tasks)} eval tasks x {cfg.validate_cases} cases x "
                 f"{len(meas.scores.lengths)} lengths, dense vs the plan (transformers)")
            v = validate(plan, meas, cfg)
            plan.provenance["validation"] = v
            if not v["passed"]:
                log(f"WARNING: the plan misses its accuracy target: its mean trails dense by "
                     f"{v['mean_below_dense']} (target {cfg.accuracy_target}); written anyway, check it with "
                     f"`headwise eval` before serving it")
    except (ModelError, PlanError, ValueError, OSError) as exc:
        print(f"headwise profile: {exc}", file=sys.stderr)
        return 1
    plan.save(args.out)
    log(f"wrote {args.out}: patterns {report['patterns']}; measured density {report['measured_density']}; "
         f"kept mass {report['kept_mass']}; measured in {report['measure_seconds']}s")
    print(args.out)
    return 0
