"""A real vLLM CPU engine running headwise with the shipped dense plan reproduces stock attention.

Two engines, one after the other: stock vLLM CPU attention, then headwise (``configs/.../dense.json``)
with ``max_num_batched_tokens=256``, so the ~1.5K-token prompt is prefilled in chunks that read
their earlier context from the paged cache while the short prompts already decode in the same
steps. Both serve the same batch (greedy, prompt logprobs). The headwise engine then serves the
long prompt again: a prefix-cache hit.
"""

from __future__ import annotations

import time

import pytest

from engine_util import (PLANS, agreeing_prefix, chat_prompt, engine, greedy, logprob_noise_ok,
                         prompt_logprob_diffs)

pytestmark = pytest.mark.engine

SHORT = ["What is the capital of France?", "Write a Python function that reverses a string.",
         "Name three colours of the rainbow.", "hi"]
GEN = 16


def _serve(llm):
    from headwise.server.commands.tasks import passkey

    task = passkey(llm.get_tokenizer(), 1500, seed=0)
    prompts = [chat_prompt(llm, p) for p in SHORT + [task.prompt]]
    return task, prompts, llm.generate(prompts, greedy(GEN, prompt_logprobs=True), use_tqdm=False)


@pytest.fixture(scope="module")
def runs():
    from prometheus_client import CollectorRegistry, generate_latest

    from headwise.server.plugin.stats import HeadwiseCollector, read_stats

    res = {}
    with engine(None) as llm:
        res["task"], res["prompts"], res["stock"] = _serve(llm)
    with engine(PLANS / "dense.json", max_num_batched_tokens=256) as llm:
        _, _, res["hw"] = _serve(llm)
        res["hw_again"] = llm.generate([res["prompts"][-1]], greedy(GEN), use_tqdm=False)[0]
        time.sleep(1.2)  # workers publish at most every 0.5 s
        res["stats"] = read_stats(llm.headwise_stats_dir)
        reg = CollectorRegistry()
        reg.register(HeadwiseCollector(llm.headwise_stats_dir))
        res["metrics"] = generate_latest(reg).decode()
    return res


def test_greedy_tokens_match_stock_up_to_near_ties(runs):
    compared = 0
    for stock, hw in zip(runs["stock"], runs["hw"]):
        n, mismatch = agreeing_prefix(stock.outputs[0], hw.outputs[0])
        assert mismatch is None, (f"token {mismatch} differs with no near-tie: stock {stock.outputs[0].text!r} "
                                  f"vs headwise {hw.outputs[0].text!r}")
        compared += n
    assert compared >= 3 * GEN  # not vacuous: most outputs agree throughout


def test_prompt_logprobs_match_stock(runs):
    diffs = [d for s, h in zip(runs["stock"], runs["hw"]) for d in prompt_logprob_diffs(s, h)]
    assert len(diffs) > 1500
    assert logprob_noise_ok(diffs), sorted(diffs)[-10:]


def test_passkey_answered_in_chunks_and_from_the_prefix_cache(runs):
    task, first, again = runs["task"], runs["hw"][-1], runs["hw_again"]
    assert task.grade(runs["stock"][-1].outputs[0].text)
    assert task.grade(first.outputs[0].text)
    assert again.num_cached_tokens and again.num_cached_tokens >= 1024  # a real prefix-cache hit
    assert task.grade(again.outputs[0].text)
    n, mismatch = agreeing_prefix(first.outputs[0], again.outputs[0])
    assert mismatch is None and n >= 4


def test_headwise_ran_and_reported_it(runs):
    st = runs["stats"]
    assert st["backend_active"] and st["workers"][0]["plan"].endswith("dense.json")
    assert st["mixed_steps"] >= 1  # long prefill chunks batched with running decodes
    assert st["tokens"]["prefill"] >= sum(len(o.prompt_token_ids) for o in runs["hw"])
    # every generated token after a request's first comes from a decode row (EOS may end one early)
    assert st["tokens"]["decode"] >= sum(len(o.outputs[0].token_ids) - 1 for o in runs["hw"])
    assert st["attention_calls"] >= 30 * st["steps"] and st["density"]["prefill"] == 1.0
    # the dense plan's dense_below (1024) sends the short prompts down the dense fallback
    assert st["requests"]["prefill"]["dense_fallback"] >= len(SHORT)
    assert "headwise_backend_active 1.0" in runs["metrics"]
    assert 'headwise_layer_density{layer="29",phase="prefill"} 1.0' in runs["metrics"]
