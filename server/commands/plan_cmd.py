"""``headwise plan validate | show | schema``: check a Plan file, summarise it, export its schema.

Exit codes: 0 ok; 2 the plan (or the model it is checked against) is not usable, with the reason
on stderr. Nothing here imports vLLM: a model's geometry is read from its ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from headwise.patterns.plan import MAX_SUMMARY_LENGTH, Plan, PlanError, load_plan

EXIT_INVALID = 2


class ModelConfigError(Exception):
    """The ``--model`` given cannot be read as a Hugging Face model config."""


def model_geometry(model: str) -> tuple[dict, str]:
    """``(geometry, source)`` from a model directory or a hub id's ``config.json``."""
    path = Path(model)
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelConfigError(f"{model}: expected a Hugging Face model directory with config.json, found none")
    elif path.is_file() and path.name == "config.json":
        cfg_path = path
    else:
        try:
            from huggingface_hub import hf_hub_download  # comes with transformers; only for hub ids
            cfg_path = Path(hf_hub_download(model, "config.json"))
        except Exception as exc:  # offline, unknown repo, no access: say which
            raise ModelConfigError(f"{model}: expected a model directory or a Hugging Face hub id, "
                                   f"could not get its config.json ({type(exc).__name__}: {exc})") from None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{cfg_path}: expected a JSON model config, found {exc}") from None
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the language model's config inside
    missing = [k for k in ("num_hidden_layers", "num_attention_heads") if k not in cfg]
    if missing:
        raise ModelConfigError(f"{cfg_path}: expected {', '.join(missing)} in the model config, found none")
    heads = int(cfg["num_attention_heads"])
    geometry = {
        "num_layers": int(cfg["num_hidden_layers"]),
        "num_heads": heads,
        "num_kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
    }
    return geometry, f"model {model}"


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        plan = load_plan(args.file)
        if args.model:
            geometry, source = model_geometry(args.model)
            plan.check_geometry(**geometry, source=source)
    except (PlanError, ModelConfigError) as exc:
        print(f"invalid plan: {exc}", file=sys.stderr)
        return EXIT_INVALID
    m = plan.model
    against = f", matches {args.model}" if args.model else ""
    print(f"ok: {args.file}: {m.num_layers} layers x {m.num_heads} heads ({m.num_kv_heads} KV, head dim "
          f"{m.head_dim}, {m.architecture}){against}")
    return 0


def format_summary(plan: Plan, length: int) -> str:
    """The per-layer table of ``plan show``."""
    rows = plan.summary(length)
    w_pre = max(len("prefill"), *(len(r.prefill) for r in rows))
    w_dec = max(len("decode"), *(len(r.decode) for r in rows))
    m, s = plan.model, plan.settings
    lines = [
        f"plan: {plan.source or '<plan>'}" + (f" ({m.name})" if m.name else ""),
        f"model: {m.architecture}, {m.num_layers} layers x {m.num_heads} heads, {m.num_kv_heads} KV heads, "
        f"head dim {m.head_dim}",
        f"settings: dense below {s.dense_below} tokens, block {s.block_size}, tidal top-k {s.tidal_top_k}, "
        f"planned generation {s.planned_generation}",
        f"expected density at {length} tokens (prefill: causal pairs kept; decode: cached tokens read per step)",
        "",
        f"{'layer':>5}  {'prefill':<{w_pre}}  {'density':>7}  {'decode':<{w_dec}}  {'density':>7}",
    ]
    for r in rows:
        lines.append(f"{r.layer:>5}  {r.prefill:<{w_pre}}  {r.prefill_density:>7.1%}  {r.decode:<{w_dec}}  "
                     f"{r.decode_density:>7.1%}")
    pre = sum(r.prefill_density for r in rows) / len(rows)
    dec = sum(r.decode_density for r in rows) / len(rows)
    lines.append(f"{'all':>5}  {'':<{w_pre}}  {pre:>7.1%}  {'':<{w_dec}}  {dec:>7.1%}")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    try:
        plan = load_plan(args.file)
    except PlanError as exc:
        print(f"invalid plan: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(format_summary(plan, args.length))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    text = json.dumps(Plan.json_schema(), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, found {text!r}") from None
    if not 1 <= value <= MAX_SUMMARY_LENGTH:
        raise argparse.ArgumentTypeError(f"expected 1..{MAX_SUMMARY_LENGTH} tokens, found {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser("plan", help="validate, summarise or describe attention Plans")
    sub = plan.add_subparsers(dest="plan_command", metavar="ACTION", required=True)

    v = sub.add_parser("validate", help="check a plan file (and optionally that it fits a model)")
    v.add_argument("file", help="plan JSON file")
    v.add_argument("--model", help="Hugging Face model directory or hub id to check the geometry against")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("show", help="per-layer patterns and expected density at a length")
    s.add_argument("file", help="plan JSON file")
    s.add_argument("--length", type=_positive, default=8192, help="prompt length in tokens (default 8192)")
    s.set_defaults(func=cmd_show)

    j = sub.add_parser("schema", help="print the plan JSON Schema (configs/plan.schema.json)")
    j.add_argument("--output", "-o", help="write to this file instead of stdout")
    j.set_defaults(func=cmd_schema)
