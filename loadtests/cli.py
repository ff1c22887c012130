"""``headwise loadtest``: the headless locust run of ``headwise.loadtests.run`` as a subcommand.

Without ``--host`` it starts ``headwise serve`` (``--serve-args`` passed on) for the run and stops
it afterwards, so ``headwise loadtest`` alone measures the embedded model with its shipped plan.
Exits 1 when any request failed or none completed.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from headwise.loadtests.run import add_arguments

    p = subparsers.add_parser(
        "loadtest",
        help="load-test a server with long streamed chat prompts (locust, headless): CSV, summary JSON, plots",
        description="Headless locust run with long chat prompts; writes locust CSV, summary.json and PNG plots.",
    )
    add_arguments(p)
    p.set_defaults(func=_cmd_loadtest)


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from headwise.loadtests.run import config_from_args, exit_on_sigterm, run_loadtest

    exit_on_sigterm()  # a stopped load test stops the server it started and its locust
    try:
        summary = run_loadtest(config_from_args(args), log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as exc:
        print(f"headwise loadtest: error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary["failures"] == 0 and summary["requests"] > 0 else 1
