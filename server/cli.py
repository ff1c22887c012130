"""``headwise``: the command line. Each subcommand lives in the module that owns its work.

Subcommand modules expose ``register(subparsers)``; they are imported only when the CLI starts,
and each keeps its heavy imports (vLLM, transformers) inside the functions that run, so
``headwise --help`` and ``headwise plan validate`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (module, why it is here) — the order is the order of `headwise --help`.
_COMMAND_MODULES = (
    "headwise.server.serve",  # serve: the OpenAI-compatible server with headwise attention
    "headwise.server.profile_cmd",  # profile: measure a model's heads and write a Plan
    "headwise.server.plan_cmd",  # plan validate / plan show
    "headwise.server.model",  # model prepare: the embedded default model
    "headwise.server.loadtest_cmd",  # loadtest: headless locust run with CSV, JSON and plots
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headwise",
        description="Per-head sparse attention for long-context serving inside vLLM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module: say so
                raise
            continue  # the subcommand is not part of this build
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    # `serve` forwards unknown flags to vLLM; every other command is strict.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `headwise plan show ... | head`: the reader left, which is fine
        sys.stdout = open(os.devnull, "w")  # keep the interpreter's final flush quiet
        return 0


if __name__ == "__main__":
    sys.exit(main())
