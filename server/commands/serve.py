"""``headwise serve``: vLLM's OpenAI-compatible server with headwise attention and a plan.

The command line a user types, and nothing else: ``launch.plan_launch`` turns it into a
``vllm serve`` launch (every vLLM flag passes through), ``supervise.supervise`` runs that launch
in a child process and makes sure nothing stays when it ends (see those modules).
"""

from __future__ import annotations

import argparse
import shutil
import sys

from .launch import ServeError, plan_launch, vllm_serve_parser
from .logline import say
from .model import DEFAULT_MODEL_NAME, ModelError



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        allow_abbrev=False,  # a prefix of a vLLM flag must never be taken for one of ours
        help="serve an OpenAI-compatible API with headwise attention (any `vllm serve` flag passes through)",
        description=(
            "Start vLLM's OpenAI-compatible server with headwise sparse attention. With no arguments it "
            f"serves the embedded {DEFAULT_MODEL_NAME} with its shipped plan. Every flag not listed here "
            "goes to `vllm serve` unchanged (see --vllm-help)."
        ),
    )
    p.add_argument("--model", default=None,
                   help=f"HF checkpoint directory or hub id (default: the embedded {DEFAULT_MODEL_NAME})")
    p.add_argument("--plan", default=None,
                   help="headwise plan JSON for this model (default for the embedded model: its shipped plan)")
    p.add_argument("--no-headwise", action="store_true",
                   help="serve with vLLM's stock attention (for comparisons)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the equivalent `vllm serve` command line and environment, start nothing")
    p.add_argument("--vllm-help", action="store_true", help="show the `vllm serve` flags and exit")
    p.set_defaults(func=_cmd_serve, accepts_extra=True)


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.vllm_help:
        vllm_serve_parser().parse_args(["serve", "--help"])
        return 0
    try:
        launch = plan_launch(args.model, args.plan, list(args.extra), headwise=not args.no_headwise)
    except (ServeError, ModelError) as exc:
        print(f"headwise serve: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        if launch.owned_stats_dir:
            shutil.rmtree(launch.owned_stats_dir, ignore_errors=True)
        print(launch.command_line())
        return 0
    attention = f"headwise attention (plan {launch.plan})" if launch.plan else "stock vLLM attention"
    say(f"serving {launch.model} with {attention}"
         + (f"; defaults: {', '.join(launch.defaults)}" if launch.defaults else ""))
    from .supervise import supervise

    return supervise(launch)  # the API server runs in a child; this process makes sure nothing stays
