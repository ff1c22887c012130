"""Headless load test: locust with bounded users, spawn rate and duration -> CSV, summary, plots.

``headwise loadtest`` (or ``python loadtests/run.py``) runs ``locustfile.py`` headless against
``--host``; with no ``--host`` it first starts ``headwise serve`` (``--serve-args`` passed on) on a
free loopback port and stops it afterwards. Locust runs in its own process: it monkey-patches the
standard library with gevent, which must not happen to the caller. Output directory:

  locust_stats.csv, locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv  (locust)
  samples.jsonl            one line per request (TTFT, ITL, end-to-end, tokens, errors)
  summary.json             totals and percentiles, overall and per prompt length
  latency_over_time.png    TTFT / ITL / end-to-end p50-p90-p99 per time window, users
  ttft_vs_prompt_length.png
  locust.log, server.log   the processes' logs
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from headwise.server import env

if __package__ in (None, ""):  # `python loadtests/run.py`: import as the installed package
    from headwise.loadtests import report
    from headwise.loadtests.mix import parse_length_mix
else:
    from . import report
    from .mix import parse_length_mix

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
# Bounds on what one run may ask for: a typo must not start ten thousand users for a day.
MAX_USERS = 1000
MAX_SPAWN_RATE = 100.0
MAX_DURATION_S = 24 * 3600
PREPARE_S = 300  # locust start plus building the prompt pool through /tokenize


@dataclass
class LoadTestConfig:
    host: str | None = None  # None: start `headwise serve` locally
    users: int = 4
    spawn_rate: float = 1.0
    duration_s: int = 60
    prompt_lengths: str = "1000:0.5,4000:0.3,7000:0.2"
    max_tokens: int = 64
    model: str = ""
    api_key: str = ""
    allow_eos: bool = False
    stop_timeout_s: int = 120  # in-flight requests may finish after the run time ends
    request_timeout_s: int = 600  # a request with no byte for this long fails (client side)
    out: str = ""
    serve_args: list[str] = field(default_factory=list)
    serve_timeout_s: int = 600

    def check(self) -> None:
        problems = []
        if not 1 <= self.users <= MAX_USERS:
            problems.append(f"--users {self.users}: expected 1..{MAX_USERS}")
        if not 0 < self.spawn_rate <= MAX_SPAWN_RATE:
            problems.append(f"--spawn-rate {self.spawn_rate}: expected > 0 and <= {MAX_SPAWN_RATE}")
        if not 1 <= self.duration_s <= MAX_DURATION_S:
            problems.append(f"--duration {self.duration_s}: expected 1..{MAX_DURATION_S} seconds")
        if self.max_tokens < 1:
            problems.append(f"--max-tokens {self.max_tokens}: expected >= 1")
        if not 1 <= self.request_timeout_s <= MAX_DURATION_S:
            problems.append(f"--request-timeout {self.request_timeout_s}: expected 1..{MAX_DURATION_S} seconds")
        if self.host is not None and not self.host.startswith(("http://", "https://")):
            problems.append(f"--host {self.host}: expected a URL such as http://127.0.0.1:8000")
        try:
            parse_length_mix(self.prompt_lengths)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LoadTestConfig()
    p.add_argument("--host", default=None, help="server URL, e.g. http://127.0.0.1:8000 (default: start "
                                                 "`headwise serve` on a free loopback port for the run)")
    p.add_argument("--users", type=int, default=d.users, help=f"concurrent users (1..{MAX_USERS})")
    p.add_argument("--spawn-rate", type=float, default=d.spawn_rate, help="users started per second")
    p.add_argument("--duration", type=int, default=d.duration_s, dest="duration_s",
                   help="run time in seconds, after which users stop sending new requests")
    p.add_argument("--prompt-lengths", default=d.prompt_lengths,
                   help="prompt length mix in tokens, TOKENS:WEIGHT,... (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens generated per request")
    p.add_argument("--model", default="", help="model name (default: the server's first)")
    p.add_argument("--api-key", default=env.get(env.API_KEY, ""),
                   help="bearer token when the server has --api-key (default: $HEADWISE_API_KEY)")
    p.add_argument("--allow-eos", action="store_true", help="stop at end of sequence (default: always --max-tokens)")
    p.add_argument("--stop-timeout", type=int, default=d.stop_timeout_s, dest="stop_timeout_s",
                   help="seconds in-flight requests may take to finish after the run time")
    p.add_argument("--request-timeout", type=int, default=d.request_timeout_s, dest="request_timeout_s",
                   help="seconds a request may wait for the server's next byte before it counts as failed")
    p.add_argument("--out", default="", help="output directory (default: ./loadtest-results/<UTC time>)")
    p.add_argument("--serve-args", default="", help="arguments for the local `headwise serve` (no --host), "
                                                     "one shell-quoted string")


def config_from_args(args: argparse.Namespace) -> LoadTestConfig:
    names = LoadTestConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in names and k != "serve_args"}
    return LoadTestConfig(**values, serve_args=shlex.split(args.serve_args or ""))


def _locust_command(cfg: LoadTestConfig, host: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "--users", str(cfg.users), "--spawn-rate", str(cfg.spawn_rate), "--run-time", f"{cfg.duration_s}s",
           "--stop-timeout", str(cfg.stop_timeout_s), "--host", host,
           "--csv", str(out / "locust"), "--csv-full-history", "--only-summary",
           "--logfile", str(out / "locust.log"),
           "--prompt-lengths", cfg.prompt_lengths, "--max-tokens", str(cfg.max_tokens),
           "--request-timeout", str(cfg.request_timeout_s),
           "--samples-file", str(out / report.SAMPLES)]
    if cfg.model:
        cmd += ["--model", cfg.model]
    if cfg.allow_eos:
        cmd += ["--allow-eos"]
    return cmd


def _run_locust(cfg: LoadTestConfig, host: str, out: Path, log) -> int:
    env = {**os.environ}
    if cfg.api_key:
        env["LOCUST_API_KEY"] = cfg.api_key  # through the environment: never on a command line
    cmd = _locust_command(cfg, host, out)
    log(f"headwise loadtest: {cfg.users} users (+{cfg.spawn_rate}/s) for {cfg.duration_s}s against {host}")
    budget = PREPARE_S + cfg.duration_s + cfg.stop_timeout_s
    with open(out / "locust.stdout.log", "ab") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            log(f"headwise loadtest: locust still running after {budget}s; stopping it")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9
        finally:  # interrupted (Ctrl-C, SIGTERM): locust must not go on loading the server alone
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so that every ``finally`` stops what it started (servers, locust)."""
    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


def run_loadtest(cfg: LoadTestConfig, log=print) -> dict:
    """Run one load test; returns the summary (also written to ``<out>/summary.json``)."""
    cfg.check()
    out = Path(cfg.out or Path("loadtest-results") / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    out.mkdir(parents=True, exist_ok=True)
    (out / report.SAMPLES).unlink(missing_ok=True)  # a re-used directory must not mix two runs
    server = None
    host = cfg.host
    try:
        if host is None:
            from headwise.server.commands.serve_process import ServerProcess

            log(f"headwise loadtest: starting headwise serve {shlex.join(cfg.serve_args)} (log: {out / 'server.log'})")
            server = ServerProcess(cfg.serve_args, log_path=out / "server.log").start(cfg.serve_timeout_s)
            host = server.url
        code = _run_locust(cfg, host.rstrip("/"), out, log)
    finally:
        if server is not None:
            server.stop()
    config = {k: v for k, v in asdict(cfg).items() if k != "api_key"} | {"host": host}
    summary = report.summarize(out, config, locust_exit_code=code)
    title = f"{summary['model'] or 'server'} at {host}: {cfg.users} users, lengths {cfg.prompt_lengths}"
    report.plot_latency_over_time(out, title)
    report.plot_ttft_vs_length(out, title)
    log(f"headwise loadtest: {summary['requests']} requests, {summary['failures']} failures; "
        f"TTFT p50 {summary['ttft_ms'].get('p50', float('nan')):.0f} ms, "
        f"ITL p50 {summary['itl_ms'].get('p50', float('nan')):.1f} ms; results in {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadtests/run.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        summary = run_loadtest(config_from_args(args))
    except ValueError as exc:
        parser.error(str(exc))
    return 0 if summary["failures"] == 0 and summary["requests"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
