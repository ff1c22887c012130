"""What ``headwise profile`` measures (the slow part): its configuration, the calibration prompts,
the model run that scores every head on them (``measure``), and the candidates' timings, measured
here (``profile_cost``) or read from an earlier plan's provenance (``--costs-from``).

``Measurements`` holds all of it and saves/loads it (``--save-scores`` / ``--from-scores``), so a
plan can be re-solved (``profile_plan.make_plan``) without running the model again. Heavy imports
(torch, transformers) happen inside the functions: building the CLI's parser imports none.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

_TASKS = ("passkey", "kv_retrieval", "variable_tracking")


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


def log(msg: str) -> None:
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
        from headwise.patterns.profile_decode import DecodeCosts, DecodeScores
        from headwise.patterns.profile_decode_rules import TidalScores

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
    from headwise.patterns.profile_decode import DecodeScores, decode_candidates
    from headwise.patterns.profile_decode_rules import TidalScores

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
    log(f"model {path}: {n_layers} layers x {n_heads} heads ({n_kv} KV heads); {len(candidates)} candidates; "
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
                            v=v if cfg.objective == "output" else None, tail=cfg.dense_tail,
                            chunk=hf.PREFILL_CHUNK)
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
            log(f"length {length} prompt {p + 1}/{cfg.prompts} ({task}, {ids.shape[1]} tokens): "
                 f"{scored_layers} layers scored in {time.monotonic() - t0:.1f}s "
                 f"(elapsed {time.monotonic() - started:.0f}s)")
    costs = decode_costs = None
    if cfg.cost == "time" and cfg.costs_from is not None:
        costs = costs_from_plan(cfg.costs_from, candidates, lengths)
        decode_costs = decode_costs_from_plan(cfg.costs_from, decode_scores.candidates, lengths,
                                              required=cfg.decode == "optimize")
        log(f"candidate timings read from {cfg.costs_from} (measured on {cfg.device} when it was made)")
    elif cfg.cost == "time":
        from .profile_cost import measure_costs, measure_decode_costs

        del model  # the timings run alone
        log(f"timing {len(candidates)} candidates for one layer at {lengths} tokens on {cfg.device} ...")
        costs = measure_costs(candidates, n_heads, n_kv, geo["head_dim"], lengths, device=cfg.device,
                              dtype=getattr(torch, cfg.dtype), log=log)
        decode_costs = measure_decode_costs(decode_scores.candidates, n_heads, n_kv, geo["head_dim"], lengths,
                                            device=cfg.device, dtype=getattr(torch, cfg.dtype), log=log)
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
