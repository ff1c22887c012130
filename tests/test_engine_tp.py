"""Tensor parallelism on the CPU: three ranks, each runs its slice of the plan's heads.

SmolLM2 has 9 query / 3 KV heads, so ``tensor_parallel_size=3`` gives every rank 3 query heads and
one KV head; each rank binds plan heads ``[3r, 3r+3)``. Three worker processes on two cores take
about a minute; it runs in CI like every other engine test.
"""

from __future__ import annotations

import time

import pytest

from engine_util import PLANS, agrees_with_transformers, chat_prompt, engine, greedy

pytestmark = pytest.mark.engine


def test_sparse_plan_under_tensor_parallel_3(monkeypatch):
    from headwise.server.plugin.stats import read_stats
    from headwise.server.commands.tasks import passkey

    # three workers on two cores: bind ranks 0 and 2 to core 0 (vLLM refuses to oversubscribe otherwise)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1|0")
    with engine(PLANS / "mixed.json", tensor_parallel_size=3, distributed_executor_backend="mp",
                max_num_batched_tokens=4096) as llm:  # one prefill chunk, as the transformers path runs it
        task = passkey(llm.get_tokenizer(), 2000, seed=1_000_000)  # the first evaluation seed
        out = llm.generate([chat_prompt(llm, task.prompt)], greedy(12), use_tqdm=False)[0]
        time.sleep(1.2)
        st = read_stats(llm.headwise_stats_dir)
    # three ranks with their slices of the heads compute what one unsharded model with the plan does
    assert agrees_with_transformers(PLANS / "mixed.json", [out], 12)[0] >= 4, out.outputs[0].text
    assert sorted(w["rank"] for w in st["workers"]) == [0, 1, 2]
    assert all(w["tp_size"] == 3 for w in st["workers"])
    # every rank contributed its heads' pairs: per-layer causal pairs are 3x one rank's
    layer = st["layers"][10]
    assert layer["causal_keys"]["prefill"] > 0 and st["density"]["prefill"] <= 0.40  # page-rounded
