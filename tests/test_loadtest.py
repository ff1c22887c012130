"""Load tests: the length mix, the report's statistics, and a short headless smoke run against a live server.

The smoke run (20 s, two users, short prompts) must end with zero failures and leave locust's
CSV, the per-request samples, summary.json and both plots behind, with contents that agree.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter

import numpy as np
import pytest

from headwise.loadtests import report
from headwise.loadtests.mix import LengthSchedule, parse_length_mix
from headwise.loadtests.run import LoadTestConfig, run_loadtest
from headwise.server.commands.serve_process import ServerProcess

KEY = "loadtest-key"


# ------------------------------------------------------------------------ the mix
def test_length_mix_parsing():
    assert parse_length_mix("1000:0.6, 4000:0.3,8000") == [(1000, 0.6), (4000, 0.3), (8000, 1.0)]
    for bad, why in [("", "at least one"), ("1k:1", "integer"), ("100:0", "weight > 0"), ("0:1", "tokens >= 1")]:
        with pytest.raises(ValueError, match=why):
            parse_length_mix(bad)


@pytest.mark.parametrize("weights", [(0.6, 0.3, 0.1), (1, 1), (5, 1, 1, 3), (0.01, 0.99)])
def test_length_schedule_follows_the_weights_at_every_prefix(weights):
    mix = [(100 * (i + 1), w) for i, w in enumerate(weights)]
    schedule, counts, total = LengthSchedule(mix), Counter(), sum(weights)
    for n in range(1, 201):
        counts[schedule.next()] += 1
        for length, w in mix:  # always less than one request away from the exact share
            assert abs(counts[length] - n * w / total) < 1, (n, counts)
    a, b = LengthSchedule(mix), LengthSchedule(mix)
    assert [a.next() for _ in range(50)] == [b.next() for _ in range(50)]  # the same order every run


# ------------------------------------------------------------------------ report statistics
def test_distribution_matches_numpy_percentiles():
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        values = [rng.expovariate(1 / 300) for _ in range(n)] + [None]  # None: a failed request
        d = report.distribution(values)
        arr = np.array(values[:-1])
        assert d["count"] == n and d["max"] == arr.max()
        for q in (50, 90, 99):  # numpy's default method is the same linear interpolation
            assert d[f"p{q}"] == pytest.approx(np.percentile(arr, q), rel=1e-12)
    assert report.distribution([None]) == {"count": 0}


# ------------------------------------------------------------------------ smoke run
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(["--api-key", KEY], log_path=tmp_path_factory.mktemp("loadtest") / "server.log")
    srv.start(timeout_s=420)
    yield srv
    srv.stop()
    assert not srv.group_alive()


@pytest.fixture(scope="module")
def smoke(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("loadtest-out")
    cfg = LoadTestConfig(host=server.url, users=2, spawn_rate=2, duration_s=20, prompt_lengths="150:1,500:1",
                         max_tokens=12, api_key=KEY, stop_timeout_s=60, out=str(out))
    return cfg, out, run_loadtest(cfg, log=lambda m: None)


@pytest.mark.server
def test_smoke_run_has_no_failures_and_honours_the_mix(smoke):
    cfg, out, summary = smoke
    assert summary["failures"] == 0, summary["errors"]
    assert summary["requests"] >= 4 and summary["locust_exit_code"] == 0
    samples = report.load_samples(out / report.SAMPLES)
    by_length = Counter(s["target_tokens"] for s in samples)
    assert set(by_length) == {150, 500} and abs(by_length[150] - by_length[500]) <= 2
    for s in samples:
        assert s["completion_tokens"] == cfg.max_tokens  # ignore_eos: fixed output length
        assert s["target_tokens"] <= s["prompt_tokens"] <= s["target_tokens"] + 80  # + template and nonce
        assert 0 < s["ttft_ms"] <= s["e2e_ms"] and s["itl_ms"] > 0


@pytest.mark.server
def test_smoke_run_writes_consistent_csv_summary_and_plots(smoke):
    cfg, out, summary = smoke
    assert json.loads((out / report.SUMMARY).read_text()) == json.loads(json.dumps(summary))
    with (out / report.STATS_CSV).open() as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    for length in (150, 500):  # the custom metrics sit next to the requests in locust's table
        for kind in ("POST", "TTFT", "ITL"):
            assert int(rows[(kind, f"chat len={length}")]["Failure Count"]) == 0
    assert (out / report.HISTORY_CSV).stat().st_size > 0
    assert summary["ttft_ms"]["p50"] <= summary["e2e_ms"]["p50"]
    assert summary["output_tokens_per_s"] > 0
    for name in (report.LATENCY_PNG, report.TTFT_PNG):
        import matplotlib.image

        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 200  # a real figure, not an empty file


def test_bounds_are_enforced_before_anything_starts(tmp_path):
    for bad, why in [(dict(users=0), "--users"), (dict(duration_s=0), "--duration"),
                     (dict(spawn_rate=0), "--spawn-rate"), (dict(host="localhost:8000"), "--host"),
                     (dict(prompt_lengths="x"), "--prompt-lengths"),
                     (dict(request_timeout_s=0), "--request-timeout")]:
        with pytest.raises(ValueError, match=why):
            run_loadtest(LoadTestConfig(out=str(tmp_path), **bad))
