"""The soak scenario, short: 8 users for 2 minutes of 1K/4K/7K prompts on a 400 MB KV cache (opt-in).

The full run (16 users, 10 minutes) is ``python -m headwise.loadtests.soak``; its results file is
committed under ``loadtests/results/``. Here the same scenario must meet the same goals: no failed
request, passkey accuracy under load equal to the unloaded run's over the same prompts, vLLM
preempted (the pressure was real), KV usage back to 0, resident memory growth <= 5%, no process left.
"""

from __future__ import annotations

import json
import os

import pytest

from headwise.loadtests.soak import run_soak

pytestmark = [
    pytest.mark.server,
    # Opt-in: on a 2-core machine it takes ~10-15 minutes (the unloaded pass over the 24 pool prompts alone
    # ~9 minutes, then the load and the drain), more than CI's budget allows. The full 10-minute scenario
    # passed (loadtests/results/soak/soak.json); this short form has not been run since the scenario gained
    # its step-share flags.
    pytest.mark.skipif(os.environ.get("HEADWISE_SOAK") != "1", reason="opt-in (~10-15 min on 2 cores): HEADWISE_SOAK=1"),
]


def test_short_soak_under_memory_pressure_meets_the_goals(tmp_path):
    result = run_soak(users=8, duration_s=120, out=tmp_path)
    shown = {k: v for k, v in result.items() if k != "samples"}
    assert result["passed"], json.dumps(shown, indent=1)
    assert (tmp_path / "soak.png").stat().st_size > 10_000
    assert len(result["samples"]) >= 120 / 5 - 2  # the sampler ran through the whole load
    print(json.dumps({k: shown[k] for k in ("requests", "preemptions", "passkey", "rss_bytes")}, indent=1))
