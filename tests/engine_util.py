"""Starting and stopping real vLLM CPU engines in tests, and comparing their greedy outputs.

``engine(plan=None, **kw)`` yields a ``vllm.LLM`` over the embedded SmolLM2-135M-Instruct (stock
attention when ``plan`` is None, headwise otherwise) and always stops every process it started:
vLLM's engine core and workers are children of the test process and outlive a dropped ``LLM``.

Greedy comparisons allow a divergence only at a *near-tie*: bf16 logits of two tokens can be equal
or a hair apart (they come in steps of 0.125 here), and a different but correct summation order
(our torch path vs the stock kernel, chunked vs not) then legitimately picks the other token,
after which the texts diverge. A position is a near-tie when, in either run, the top-2 logprobs
are closer than ``TIE_NATS``. Agreeing near-ties are compared through.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "configs" / "smollm2-135m-instruct"
# Top-2 gaps of the same position under two correct bf16 attention implementations differed by at
# most 0.25 nats (two bf16 logit steps) over ~90 generated tokens here; 0.35 marks a near-tie.
TIE_NATS = 0.35
# fp32, as ``headwise serve`` runs on CPUs without native bf16 (CI's and ours): ~6x faster than
# emulated bf16 there, and comparisons between two correct paths are then tight.
BASE_KW = dict(enforce_eager=True, max_model_len=4096, seed=0, gpu_memory_utilization=0.5, dtype="float32")


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def stop_new_processes(before: set[int]) -> None:
    """Stop what the engine started: let it exit after shutdown, then kill what is left. The
    multiprocessing resource tracker is this process's helper (it unlinks shared memory the engine
    leaves behind), not part of the engine: it stays."""
    procs = []
    for pid in _children() - before:
        try:
            p = psutil.Process(pid)
            if not any("resource_tracker" in part for part in p.cmdline()):
                procs.append(p)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=30)


@contextmanager
def engine(plan: str | os.PathLike | None = None, **kw):
    import vllm

    from headwise.server import plugin
    from headwise.server.commands.model import resolve_model

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; keeps several engines in 24 GiB
    before = _children()
    kw = {**BASE_KW, **kw}
    stats = tempfile.TemporaryDirectory(prefix="headwise-test-stats-")
    if plan is None:
        plugin.disable()
    else:
        kw = plugin.engine_args(plan, stats_dir=stats.name, **kw)
    llm = None
    try:
        llm = vllm.LLM(resolve_model(None), **kw)
        llm.headwise_stats_dir = (kw.get("additional_config") or {}).get("headwise", {}).get("stats_dir")
        yield llm
    finally:
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - teardown must go on to the kill below
                pass
        stop_new_processes(before)
        plugin.disable()
        stats.cleanup()


def chat_prompt(llm, text: str) -> str:
    tok = llm.get_tokenizer()
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def greedy(max_tokens: int, prompt_logprobs: bool = False, **kw):
    import vllm

    return vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2,
                               prompt_logprobs=1 if prompt_logprobs else None, **kw)


def _is_tie(step_logprobs) -> bool:
    vals = sorted((lp.logprob for lp in step_logprobs.values()), reverse=True)
    return len(vals) >= 2 and vals[0] - vals[1] < TIE_NATS


def agreeing_prefix(a, b) -> tuple[int, int | None]:
    """Compare two CompletionOutputs token by token until they diverge.

    Returns (tokens that agree, index of the first disagreement that is *not* a near-tie, or None
    when they agree throughout or part at a near-tie).
    """
    n = min(len(a.token_ids), len(b.token_ids))
    for i in range(n):
        if a.token_ids[i] != b.token_ids[i]:
            return i, None if _is_tie(a.logprobs[i]) or _is_tie(b.logprobs[i]) else i
    return n, None


def logprob_noise_ok(diffs: list[float], mean: float = 0.03, p99: float = 0.35, worst: float = 2.0) -> bool:
    """Prompt-logprob differences that bf16 noise explains, and a broken attention would not.

    A wrong mask or a wrong KV read moves logprobs by nats on many tokens: the mean and the 99th
    percentile catch that. bf16 rounding differences amplified through 30 layers move single
    tokens. Measured here over ~2K-token prompts (mean / p99 / max, nats): stock chunked vs whole
    0.011 / 0.14 / 0.40 (the linear layers round differently by batch shape); stock vs headwise
    dense 0.012 / - / 0.43. The defaults leave ~2-3x room over those.
    """
    d = sorted(diffs)
    return sum(d) / len(d) < mean and d[int(0.99 * (len(d) - 1))] < p99 and d[-1] < worst


def prompt_logprob_diffs(a, b) -> list[float]:
    """|logprob(a) - logprob(b)| of every prompt token (both RequestOutputs of the same prompt)."""
    out = []
    for tok, la, lb in zip(a.prompt_token_ids[1:], a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        out.append(abs(la[tok].logprob - lb[tok].logprob))
    return out


def agrees_with_transformers(plan, outs, max_tokens: int) -> list[int]:
    """Greedy tokens of each engine ``RequestOutput`` against the transformers integration with the
    same plan (fp32; on CPU it reads the engine's 32-token pages). They may part only where the
    engine's top two tokens were a near-tie. Returns the tokens that agree, per output."""
    import torch

    from headwise.server.commands.model import resolve_model
    from headwise.server.plugin import hf

    model = hf.load_model(str(resolve_model(None)), "float32", "cpu")
    hf.attach_plan(model, plan)
    agreed = []
    for o in outs:
        ids = torch.tensor([o.prompt_token_ids])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
        theirs, ours = gen[0, ids.shape[1]:].tolist(), list(o.outputs[0].token_ids)
        n = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
        assert n == min(len(ours), len(theirs)) or _is_tie(o.outputs[0].logprobs[n]), \
            f"token {n}: engine {ours} ({o.outputs[0].text!r}), transformers {theirs}"
        agreed.append(n)
    return agreed
