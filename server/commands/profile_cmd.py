"""``headwise profile``: measure every head of a model on calibration prompts and write a Plan.

    headwise profile --model M --out PLAN.json [--lengths 1024,2048] [--prompts 4]
                     [--density-budget 0.3] [--seed 0]

The model runs in Hugging Face transformers with the headwise attention in capture mode: dense
attention through the headwise kernels, and each layer's q/k handed to ``score_layer`` as the
forward passes, so nothing is kept between layers. Calibration prompts are the retrieval tasks
of ``headwise.server.commands.tasks`` with the expected answer appended as the assistant's reply, so the
last rows scored are the rows that must find the needle. ``choose_patterns`` (a MILP) then picks
one prefill pattern per head under the density budget, decode patterns follow the rules in
``patterns.profile.decode_for``, and the Plan is written atomically with its provenance in
``description``. Progress goes to stderr; the same code runs on a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

_TASKS = ("passkey", "kv_retrieval", "variable_tracking")


@dataclass
class ProfileConfig:
    model: str | None = None
    lengths: tuple[int, ...] = (1024, 2048)
    prompts: int = 4  # per length
    density_budget: float = 0.3
    seed: int = 0
    tasks: tuple[str, ...] = _TASKS
    sample_blocks: int = 4  # query blocks of 64 scored per prompt
    max_per_layer: int | None = 3  # distinct prefill patterns per layer (None: no limit)
    per_length: bool = False  # budget at every length instead of on the mean over lengths
    dense_below: int | None = None  # default: the shortest calibration prompt, rounded down to 64
    decode: str = "auto"
    tidal_top_k: int = 256
    select_layers: tuple[int, ...] | None = None  # default: chosen from the measured reuse mass
    selections: int = 4  # TidalDecode selection layers to place
    min_reuse_mass: float = 0.9  # a head keeping less of its answer-row mass on the reused pick decodes densely
    planned_generation: int = 256
    dtype: str = "bfloat16"
    device: str = "cpu"
    num_layers: int | None = None  # profile only the first N layers (tests); the plan still covers all


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

    def save(self, path: Path) -> None:
        """``.npz`` with the score sums and a JSON header (candidates as plan JSON)."""
        import json

        import numpy as np

        header = {"geometry": self.geometry, "model_path": self.model_path, "lengths": self.scores.lengths,
                  "candidates": [c.model_dump(mode="json") for c in self.scores.candidates],
                  "prompt_tokens": {str(k): v for k, v in self.prompt_tokens.items()}, "seconds": self.seconds,
                  "tidal_top_k": self.tidal.top_k if self.tidal else None}
        arrays = {"mass_sum": self.scores.mass_sum, "density_sum": self.scores.density_sum,
                  "count": self.scores.count}
        if self.tidal is not None:
            arrays.update(tidal_sum=self.tidal.mass_sum, tidal_count=self.tidal.count)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, header=np.array(json.dumps(header)), **arrays)

    @classmethod
    def load(cls, path: Path) -> "Measurements":
        import json

        import numpy as np
        from pydantic import TypeAdapter

        from headwise.patterns.plan import PrefillSpec
        from headwise.patterns.profile import ProfileScores
        from headwise.patterns.profile_decode import TidalScores

        data = np.load(path)
        header = json.loads(str(data["header"]))
        adapter = TypeAdapter(PrefillSpec)
        candidates = [adapter.validate_python(c) for c in header["candidates"]]
        n_layers = data["mass_sum"].shape[0]
        scores = ProfileScores(n_layers, data["mass_sum"].shape[1], candidates, header["lengths"])
        scores.mass_sum, scores.density_sum, scores.count = data["mass_sum"], data["density_sum"], data["count"]
        tidal = None
        if "tidal_sum" in data:
            tidal = TidalScores(n_layers, header["tidal_top_k"], data["tidal_sum"].shape[2])
            tidal.mass_sum, tidal.count = data["tidal_sum"], data["tidal_count"]
        return cls(header["geometry"], header["model_path"], scores, tidal,
                   {int(k): v for k, v in header["prompt_tokens"].items()}, header["seconds"])


def measure(cfg: ProfileConfig) -> Measurements:
    """Run the model on the calibration prompts and score every head (the slow part)."""
    import torch
    from transformers import AutoTokenizer

    from headwise.patterns.profile import ProfileScores, default_candidates, score_layer
    from headwise.patterns.profile_decode import TidalScores

    from headwise.server.plugin import hf
    from .model import read_geometry, resolve_model

    started = time.monotonic()
    path = resolve_model(cfg.model)
    geo = read_geometry(path)
    n_layers, n_heads, n_kv = geo["num_layers"], geo["num_heads"], geo["num_kv_heads"]
    scored_layers = min(n_layers, cfg.num_layers or n_layers)
    lengths = sorted(set(cfg.lengths))
    candidates = default_candidates(max(lengths))
    _log(f"model {path}: {n_layers} layers x {n_heads} heads ({n_kv} KV heads); {len(candidates)} candidates; "
         f"lengths {lengths}; {cfg.prompts} prompts per length")

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = hf.load_model(path, cfg.dtype, cfg.device)
    if scored_layers < n_layers:  # tests: a truncated model scores its first layers only
        model.model.layers = model.model.layers[:scored_layers]
        model.config.num_hidden_layers = scored_layers
    scores = ProfileScores(scored_layers, n_heads, candidates, lengths)
    tidal = TidalScores(scored_layers, cfg.tidal_top_k, n_heads)
    current = {"li": 0}

    def capture(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        # q: [S, Hq, D], k: [S, Hkv, D] of one prompt, RoPE applied
        score = score_layer(q, k, candidates, layer_heads=n_heads, layer_kv_heads=n_kv,
                            n_blocks=cfg.sample_blocks, total_len=q.shape[0] + cfg.planned_generation)
        scores.add(layer, current["li"], score)
        tidal.add(layer, score.sample)

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
    return Measurements(geo, path, scores, tidal, prompt_tokens, round(time.monotonic() - started, 1))


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
    for li, n in enumerate(lengths):
        if n < dense_below:
            _log(f"warning: length {n} is below dense_below={dense_below}: it runs dense, density 1.0")
            density[..., li] = 1.0
    t0 = time.monotonic()
    choice = choose_patterns(mass, density, cfg.density_budget, per_length=cfg.per_length,
                             max_per_layer=cfg.max_per_layer)
    _log(f"MILP: {choice.status} in {time.monotonic() - t0:.1f}s; kept mass {choice.kept_mass:.4f}; density "
         + ", ".join(f"{n}: {d:.3f}" for n, d in zip(lengths, choice.density)))

    decode_mass = None
    measured = meas.tidal is not None and scored_layers == n_layers
    reuse = meas.tidal.reuse() if measured else None  # [L, L, H]
    if cfg.select_layers is not None:
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
    decode = [[decode_for(prefill[l][h], l, select, cfg.decode, reuse_ok=reuse_ok(l, h)) for h in range(n_heads)]
              for l in range(n_layers)]
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
        "tasks": list(cfg.tasks), "seed": cfg.seed, "density_budget": cfg.density_budget,
        "kept_mass": round(choice.kept_mass, 4),
        "measured_density": {str(n): round(d, 4) for n, d in zip(lengths, choice.density)},
        "patterns": counts, "select_layers": select, "tidal_top_k": cfg.tidal_top_k,
        "decode_mass": None if decode_mass is None else round(decode_mass, 4), "decode": cfg.decode,
        "dense_reuse_heads": dense_reuse, "min_reuse_mass": cfg.min_reuse_mass,
        "milp": choice.status, "candidates": [describe(c) for c in candidates], "scored_layers": scored_layers,
        "measure_seconds": meas.seconds, "dense_kept_mass": float(np.mean(mass[..., 0, :])),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    description = ("profiled by `headwise profile`: " + "; ".join(
        f"{k}={report[k]}" for k in ("lengths", "prompts", "tasks", "seed", "density_budget", "measured_density",
                                     "kept_mass", "select_layers", "tidal_top_k", "decode_mass", "min_reuse_mass",
                                     "dense_reuse_heads", "created")))
    geometry = ModelGeometry(name=Path(meas.model_path).name, **{
        k: geo[k] for k in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim")})
    settings = Settings(dense_below=dense_below, tidal_top_k=cfg.tidal_top_k,
                        planned_generation=cfg.planned_generation)
    return Plan.from_tables(geometry, prefill, decode, settings, description=description), report


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


def register(subparsers: argparse._SubParsersAction) -> None:
    d = ProfileConfig()
    p = subparsers.add_parser("profile", help="measure each head on calibration prompts and write a Plan (JSON)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint dir or hub id (default: the embedded SmolLM2)")
    p.add_argument("--out", required=True, type=Path, help="plan file to write (atomically)")
    p.add_argument("--lengths", type=_int_list, default=d.lengths, help="calibration lengths in tokens (default 1024,2048)")
    p.add_argument("--prompts", type=int, default=d.prompts, help="calibration prompts per length (default 4)")
    p.add_argument("--density-budget", type=float, default=d.density_budget,
                   help="mean prefill density over heads and lengths (default 0.3)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the calibration prompts")
    p.add_argument("--tasks", default=",".join(d.tasks), help=f"calibration tasks (default {','.join(d.tasks)})")
    p.add_argument("--sample-blocks", type=int, default=d.sample_blocks, help="64-query blocks scored per prompt")
    p.add_argument("--max-per-layer", type=int, default=d.max_per_layer,
                   help="distinct prefill patterns per layer (0: no limit; default 3)")
    p.add_argument("--per-length", action="store_true", help="hold the budget at every length, not on the mean")
    p.add_argument("--dense-below", type=int, default=None, help="plan's dense_below (default: shortest calibration prompt, rounded down to 64)")
    p.add_argument("--decode", choices=("auto", "tidal", "matched", "dense"), default=d.decode,
                   help="decode rule: auto = TidalDecode, dense for heads measured to lose on reuse (default); "
                        "tidal = TidalDecode everywhere; matched = window heads keep their span, others dense")
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
    if args.prompts < 1:
        print(f"headwise profile: --prompts must be at least 1, found {args.prompts}", file=sys.stderr)
        return 2
    cfg = ProfileConfig(model=args.model, lengths=args.lengths, prompts=args.prompts,
                        density_budget=args.density_budget, seed=args.seed, tasks=tasks,
                        sample_blocks=args.sample_blocks, max_per_layer=args.max_per_layer or None,
                        per_length=args.per_length, dense_below=args.dense_below, decode=args.decode,
                        tidal_top_k=args.tidal_top_k, select_layers=args.select_layers, selections=args.selections,
                        min_reuse_mass=args.min_reuse_mass,
                        planned_generation=args.planned_generation, dtype=args.dtype, device=args.device)
    try:
        if args.from_scores:
            meas = Measurements.load(args.from_scores)
            if meas.tidal is not None and meas.tidal.top_k != cfg.tidal_top_k:
                _log(f"note: the saved TidalDecode scores were measured at top-{meas.tidal.top_k}; "
                     f"the plan uses top-{cfg.tidal_top_k}")
        else:
            meas = measure(cfg)
        if args.save_scores:
            meas.save(args.save_scores)
        plan, report = make_plan(meas, cfg)
    except (ModelError, PlanError, ValueError, OSError) as exc:
        print(f"headwise profile: {exc}", file=sys.stderr)
        return 1
    plan.save(args.out)
    _log(f"wrote {args.out}: patterns {report['patterns']}; measured density {report['measured_density']}; "
         f"kept mass {report['kept_mass']}; measured in {report['measure_seconds']}s")
    print(args.out)
    return 0
