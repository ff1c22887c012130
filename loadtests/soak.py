"""Soak under memory pressure: long prompts, a KV cache too small for them all, resident memory sampled.

``python -m headwise.loadtests.soak`` starts ``headwise serve`` with a small KV cache (default
``--kv-cache-memory-bytes 400M``: about 17.8K tokens of SmolLM2 in bf16, 9.1K in fp32, the CPU default
without native bf16) and a scheduler step that several prompts share, so that vLLM must preempt and
recompute. vLLM 0.32 admits a request only when its whole prompt fits in the blocks free at that
moment (``scheduler_reserve_full_isl``); with one prompt per step (its default: a long prefill takes
the step's whole token budget) that never over-fills the cache, and with 32-token answers nothing
was ever preempted (a 10-minute run: 0 preemptions, KV at most 89%, 2-3 requests running). Capping
each prompt's share of a step (``--long-prefill-token-threshold PREFILL_SHARE`` of
``--max-num-batched-tokens STEP_TOKENS``) lets several prompts prefill side by side, each admitted
while the others have written only their first chunks, so together they outgrow the cache: the
pressure a busy deployment with long prompts meets. (Turning the guard off as well,
``--no-scheduler-reserve-full-isl``, was tried: 49 preemptions in 10 minutes, and the recomputation
halved the requests served.) A request fails only if the server errs or sends nothing for
``REQUEST_TIMEOUT_S`` (the load test's ``--request-timeout``): with 16 users on 2 CPU cores a 7K
prompt waits behind the whole queue (TTFT p50 ~6 minutes), and latency is the serve benchmark's
measure, not the soak's. Then it

1. asks every prompt of the load test's pool once, alone: the *unloaded* passkey answers;
2. runs the headless locust load test (``run.py``) with ``--users`` users for ``--duration``
   seconds, prompts ``--prompt-lengths`` (default 1K/4K/7K), while a sampler records every
   ``SAMPLE_S`` the resident memory of each server process (supervisor, API server, engine core,
   worker) and vLLM's KV usage, running/waiting requests and preemptions from ``/metrics``;
3. waits for the server to be idle and checks the goals.

Goals (``checks`` in the results file): zero failed requests; passkey accuracy under load equal
to the unloaded accuracy over the same prompts; preemptions happened (the pressure was real); KV
usage back to 0 afterwards; the server's resident memory after the run at most ``MAX_RSS_GROWTH``
above what it was after the unloaded pass (the server was warm then: every prompt length seen);
no server process left after the stop.

Writes ``<out>/soak.json`` and ``<out>/soak.png`` (memory, KV usage and requests over time),
and the load test's own files under ``<out>/loadtest/``. Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import requests

from headwise.loadtests.run import LoadTestConfig, exit_on_sigterm, run_loadtest

SAMPLE_S = 5.0
MAX_RSS_GROWTH = 0.05
IDLE_WAIT_S = 900.0  # the queue left when the load stops drains at the machine's speed
KV_BYTES = "400M"
STEP_TOKENS = 1024  # token budget per scheduler step (--max-num-batched-tokens)
PREFILL_SHARE = 256  # at most this many of a step's tokens for one prompt (--long-prefill-token-threshold)
PRESSURE_ARGS = ["--max-num-batched-tokens", str(STEP_TOKENS), "--long-prefill-token-threshold", str(PREFILL_SHARE)]
REQUEST_TIMEOUT_S = 1800  # no byte for this long: the request failed
METRICS = {  # name in /metrics -> key in the samples
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_preemptions_total": "preemptions",
}


def read_metrics(url: str) -> dict[str, float]:
    """The ``METRICS`` series from ``/metrics`` (summed over label sets)."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {key: 0.0 for key in METRICS.values()}
    text = requests.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = METRICS.get(sample.name)
            if key is not None:
                found[key] += sample.value
    return found


def server_rss(server) -> dict[str, int]:
    """Resident bytes of every live process of the server's session, by role."""
    import psutil

    from headwise.server.commands.serve_process import live_group_members

    rss: dict[str, int] = {}
    for pid in live_group_members(server.proc.pid):
        try:
            p = psutil.Process(pid)
            name = p.name()
            if pid == server.proc.pid:
                role = "supervisor"
            elif "EngineCore" in name:
                role = "engine_core"
            elif "Worker" in name:
                role = "worker"
            elif p.ppid() == server.proc.pid:
                role = "api_server"
            else:
                role = "other"
            rss[role] = rss.get(role, 0) + p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return rss


class Sampler(threading.Thread):
    def __init__(self, server, every_s: float = SAMPLE_S):
        super().__init__(daemon=True)
        self.server, self.every_s = server, every_s
        self.samples: list[dict] = []
        self.phase = "warm-up"
        self._halt = threading.Event()  # not _stop: threading.Thread has a _stop method join() calls

    def sample(self) -> dict:
        s = {"t": time.time(), "phase": self.phase, "rss": server_rss(self.server)}
        try:
            s.update(read_metrics(self.server.url))
        except (requests.RequestException, ValueError) as exc:
            s["metrics_error"] = str(exc)
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def unloaded_answers(url: str, lengths: list[int], max_tokens: int) -> dict[tuple[int, str], bool]:
    """Every prompt of the load test's pool (same builder, same seeds) asked once, alone.

    Keyed ``(target length, pass key)``: the key comes from the seed alone, so the same seed hides
    the same key at every length, and only the pair names one prompt.
    """
    from headwise.loadtests.mix import PROMPTS_PER_LENGTH, RemoteTokenizer
    from headwise.server.commands.tasks import passkey

    model = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    tok = RemoteTokenizer(url, model, {})
    answers = {}
    for n in lengths:
        for seed in range(PROMPTS_PER_LENGTH):
            item = passkey(tok, n, seed=seed)
            body = {"model": model, "messages": [{"role": "user", "content": f"Request unloaded{n}-{seed}.\n{item.prompt}"}],
                    "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
            r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600)
            r.raise_for_status()
            answers[(n, item.answer)] = item.grade(r.json()["choices"][0]["message"]["content"])
    return answers


def _total(rss: dict[str, int]) -> int:
    return sum(v for k, v in rss.items() if k != "supervisor")


def plot(samples: list[dict], path: Path, title: str) -> None:
    from headwise.loadtests.report import _pyplot

    plt = _pyplot()
    t0 = samples[0]["t"]
    t = [(s["t"] - t0) / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    roles = sorted({r for s in samples for r in s["rss"]})
    for role in roles:
        axes[0].plot(t, [s["rss"].get(role, 0) / 2**20 for s in samples], label=role)
    axes[0].plot(t, [_total(s["rss"]) / 2**20 for s in samples], label="server total (no supervisor)", color="k")
    axes[0].set_ylabel("resident MiB")
    axes[0].legend(fontsize=8)
    axes[1].plot(t, [100 * s.get("kv_usage", 0) for s in samples], label="KV cache usage %")
    axes[1].set_ylabel("KV usage %")
    axes[2].plot(t, [s.get("running", 0) for s in samples], label="running")
    axes[2].plot(t, [s.get("waiting", 0) for s in samples], label="waiting")
    axes[2].plot(t, [s.get("preemptions", 0) for s in samples], label="preemptions (total)")
    axes[2].set_ylabel("requests")
    axes[2].set_xlabel("minutes")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        starts = [x for x, a, b in zip(t[1:], samples, samples[1:]) if a["phase"] != b["phase"]]
        for x in starts:
            ax.axvline(x, color="grey", ls=":")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_soak(users: int, duration_s: int, out: Path, prompt_lengths: str = "1000:1,4000:1,7000:1",
             max_tokens: int = 32, kv_bytes: str = KV_BYTES, serve_args: list[str] = (), log=print) -> dict:
    from headwise.loadtests.mix import parse_length_mix
    from headwise.server.commands.serve_process import ServerProcess

    out.mkdir(parents=True, exist_ok=True)
    args = ["--kv-cache-memory-bytes", kv_bytes, *PRESSURE_ARGS, *serve_args]
    server = ServerProcess(args, log_path=out / "server.log")
    log(f"soak: starting headwise serve {' '.join(args)}")
    server.start(600)
    sampler = Sampler(server)
    sampler.start()
    try:
        sampler.phase = "unloaded"
        t = time.time()
        lengths = [n for n, _ in parse_length_mix(prompt_lengths)]
        unloaded = unloaded_answers(server.url, lengths, max_tokens)
        log(f"soak: unloaded pass: {sum(unloaded.values())}/{len(unloaded)} correct in {time.time() - t:.0f}s")
        warm = sampler.sample()
        sampler.phase = "load"
        summary = run_loadtest(LoadTestConfig(host=server.url, users=users, spawn_rate=max(1.0, users / 8),
                                              duration_s=duration_s, prompt_lengths=prompt_lengths,
                                              max_tokens=max_tokens, request_timeout_s=REQUEST_TIMEOUT_S,
                                              out=str(out / "loadtest")), log=log)
        sampler.phase = "after"
        load_end = time.time()
        deadline = load_end + IDLE_WAIT_S
        while time.time() < deadline:
            now = sampler.sample()
            if now.get("running", 1) == 0 and now.get("waiting", 1) == 0 and now.get("kv_usage", 1) == 0:
                break
            time.sleep(2)
        drain_s = time.time() - load_end
        log(f"soak: load stopped; the server was idle after {drain_s:.0f}s")
        time.sleep(2 * SAMPLE_S)  # a few idle samples for the curve
        end = sampler.sample()
    finally:
        try:
            sampler.stop()
        finally:
            server.stop()  # whatever failed above, the server never outlives the soak
    left = server.group_alive()
    samples_path = out / "loadtest" / "samples.jsonl"
    loaded = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    def prompt(s: dict) -> tuple[int, str]:
        return (s["target_tokens"], s.get("answer"))

    ok = [s for s in loaded if s["ok"] and prompt(s) in unloaded]
    expected = sum(unloaded[prompt(s)] for s in ok) / len(ok) if ok else None
    achieved = sum(bool(s["correct"]) for s in ok) / len(ok) if ok else None
    differ = sum(bool(s["correct"]) != unloaded[prompt(s)] for s in ok)
    warm_rss, end_rss = _total(warm["rss"]), _total(end["rss"])
    growth = end_rss / warm_rss - 1 if warm_rss else None
    load_samples = [s for s in sampler.samples if s["phase"] == "load"]
    checks = {
        "zero_failures": summary["failures"] == 0 and summary["requests"] > 0,
        "passkey_accuracy_equal_to_unloaded": achieved is not None and achieved >= expected,
        "preempted": end.get("preemptions", 0) > warm.get("preemptions", 0),
        "kv_usage_back_to_0": end.get("kv_usage") == 0 and end.get("running") == 0,
        "rss_growth_at_most_5pct": growth is not None and growth <= MAX_RSS_GROWTH,
        "no_process_left": not left,
    }
    result = {
        "scenario": {"users": users, "duration_s": duration_s, "prompt_lengths": prompt_lengths,
                     "max_tokens": max_tokens, "kv_cache_memory_bytes": kv_bytes, "serve_args": args,
                     "request_timeout_s": REQUEST_TIMEOUT_S,
                     "sample_every_s": SAMPLE_S},
        "checks": checks,
        "passed": all(checks.values()),
        "requests": summary["requests"], "failures": summary["failures"], "errors": summary["errors"],
        "passkey": {"unloaded_prompts": len(unloaded), "unloaded_correct": sum(unloaded.values()),
                    "under_load_requests": len(ok), "under_load_accuracy": achieved,
                    "unloaded_accuracy_same_prompts": expected, "requests_differing_from_unloaded": differ,
                    "unloaded": {f"{n}:{key}": right for (n, key), right in sorted(unloaded.items())}},
        "preemptions": end.get("preemptions", 0) - warm.get("preemptions", 0),
        "drain_after_load_s": drain_s,
        "kv_usage_max_under_load": max((s.get("kv_usage", 0) for s in load_samples), default=None),
        "waiting_max_under_load": max((s.get("waiting", 0) for s in load_samples), default=None),
        "rss_bytes": {"after_unloaded_pass": warm["rss"], "after_run": end["rss"],
                      "server_total_after_unloaded_pass": warm_rss, "server_total_after_run": end_rss,
                      "server_total_max": max(_total(s["rss"]) for s in sampler.samples), "growth": growth},
        "latency": {m: summary[m] for m in ("ttft_ms", "itl_ms", "e2e_ms") if m in summary},
        "requests_per_s": summary["requests_per_s"],
        "samples": sampler.samples,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(sampler.samples, out / "soak.png", f"soak: {users} users, {duration_s}s, {prompt_lengths}, KV {kv_bytes}")
    log(f"soak: {'PASSED' if result['passed'] else 'FAILED'} {checks}; results in {out}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m headwise.loadtests.soak", description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--duration", type=int, default=600, help="load seconds")
    p.add_argument("--prompt-lengths", default="1000:1,4000:1,7000:1")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--kv-cache-memory-bytes", default=KV_BYTES)
    p.add_argument("--out", default="loadtests/results/soak")
    args = p.parse_args(argv)
    exit_on_sigterm()  # a stopped soak stops its server and its locust
    result = run_soak(args.users, args.duration, Path(args.out), args.prompt_lengths, args.max_tokens,
                      args.kv_cache_memory_bytes, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
