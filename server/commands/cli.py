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
    "headwise.server.commands.serve",  # serve: the OpenAI-compatible server with headwise attention
    "headwise.server.commands.profile_cmd",  # profile: measure a model's heads and write a Plan
    "headwise.server.commands.plan_cmd",  # plan validate / plan show
    "headwise.server.commands.model",  # model prepare: the embedded default model
)
# Commands that live outside the server floor (``headwise loadtest`` in ``headwise.loadtests``)
# join through this entry-point group, so no server module imports them.
ENTRY_POINT_GROUP = "headwise.commands"


def _command_modules() -> list[str]:
    from importlib.metadata import entry_points

    extra = sorted(ep.value for ep in entry_points(group=ENTRY_POINT_GROUP))
    return [*_COMMAND_MODULES, *(m for m in extra if m not in _COMMAND_MODULES)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headwise",
        description="Per-head sparse attention for long-context serving inside vLLM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _command_modules():
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
