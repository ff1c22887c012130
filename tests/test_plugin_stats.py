"""Worker stats -> snapshot files -> read_stats / Prometheus, without an engine."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from headwise.server.plugin import stats
from headwise.server.plugin.stats import HeadwiseCollector, StatsRecorder, read_stats


def _recorder(tmp_path, rank: int, tp: int = 2) -> StatsRecorder:
    return StatsRecorder(num_layers=3, stats_dir=str(tmp_path), rank=rank, tp_size=tp, plan="/plans/x.json")


def test_empty_or_missing_dir_reads_as_inactive(tmp_path):
    for d in (None, tmp_path / "absent", tmp_path):
        st = read_stats(d)
        assert st["backend_active"] is False and st["workers"] == [] and st["layers"] == []
        assert st["density"] == {"prefill": None, "decode": None}


def test_two_ranks_merge_keys_sum_seconds_max_counters_from_rank0(tmp_path):
    r0, r1 = _recorder(tmp_path, 0), _recorder(tmp_path, 1)
    # each rank owns half the heads: its kept/causal pairs add up
    r0.add_keys(layer=1, phase=0, kept=30, causal=100)
    r1.add_keys(layer=1, phase=0, kept=10, causal=100)
    r0.add_keys(layer=2, phase=1, kept=5, causal=50)
    r0.add_call(1, 0.25)
    r1.add_call(1, 0.5)
    for r in (r0, r1):
        r.add_step(prefill_tokens=7, decode_tokens=2, prefill_sparse=1, prefill_dense=0, decode_sparse=1, decode_dense=1)
    r0.publish()  # one snapshot file per rank
    r1.publish()
    st = read_stats(tmp_path)
    assert st["backend_active"] and len(st["workers"]) == 2
    assert st["layers"][1]["density"]["prefill"] == pytest.approx(40 / 200)
    assert st["layers"][2]["density"] == {"prefill": None, "decode": pytest.approx(0.1)}
    assert st["layers"][1]["attention_seconds"] == pytest.approx(0.5)  # concurrent ranks: max
    assert st["attention_calls"] == 2
    assert st["steps"] == 1 and st["tokens"] == {"prefill": 7, "decode": 2}  # not doubled by rank 1
    assert st["requests"]["decode"] == {"sparse": 1, "dense_fallback": 1}
    assert st["density"]["prefill"] == pytest.approx(0.2)
    assert st["plan"] == "/plans/x.json"


def test_publish_is_atomic_and_throttled(tmp_path):
    r = _recorder(tmp_path, 0, tp=1)
    r.publish()
    first = json.loads(r.path.read_text())
    r.add_call(0, 1.0)
    r.maybe_publish()  # within the interval: nothing written
    assert json.loads(r.path.read_text())["attention_calls"] == first["attention_calls"] == 0
    r._last_publish -= stats.PUBLISH_INTERVAL_S
    r.maybe_publish()
    assert json.loads(r.path.read_text())["attention_calls"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [r.path.name]  # no temp files left


def test_device_counts_accumulate_in_place_and_fold_in_when_flushed(tmp_path):
    torch = pytest.importorskip("torch")
    r = _recorder(tmp_path, 0, tp=1)
    r.add_keys_tensor(0, 1, torch.tensor(3), torch.tensor(10))
    acc = r._device_keys
    r.add_keys_tensor(0, 1, torch.tensor(4), torch.tensor(10))
    assert r._device_keys is acc  # one persistent buffer: a captured CUDA graph's replays add into it
    assert r.kept[0][1] == 0  # nothing read back yet
    r.flush_device(force=True)
    assert (r.kept[0][1], r.causal[0][1]) == (7, 20)
    r.add_keys_tensor(0, 1, torch.tensor(5), torch.tensor(10))
    r.flush_device()  # within PUBLISH_INTERVAL_S of the last read: deferred
    assert r.kept[0][1] == 7
    r._last_flush -= stats.PUBLISH_INTERVAL_S
    r.flush_device()
    assert (r.kept[0][1], r.causal[0][1]) == (12, 30) and int(acc.sum()) == 0


def test_collector_exposes_headwise_metrics(tmp_path):
    r = _recorder(tmp_path, 0, tp=1)
    r.add_keys(0, 0, kept=25, causal=100)
    r.add_call(0, 0.125)
    r.add_step(prefill_tokens=100, decode_tokens=0, prefill_sparse=1, prefill_dense=0, decode_sparse=0, decode_dense=0)
    r.publish()
    reg = CollectorRegistry()
    reg.register(HeadwiseCollector(tmp_path))
    text = generate_latest(reg).decode()
    assert "headwise_backend_active 1.0" in text
    assert 'headwise_layer_density{layer="0",phase="prefill"} 0.25' in text
    assert 'headwise_requests_total{path="sparse",phase="prefill"} 1.0' in text
    assert "headwise_attention_seconds_total 0.125" in text
    assert "headwise_steps_total 1.0" in text
    # before any worker published, the gauge says so (the silent-fallback alarm)
    reg2 = CollectorRegistry()
    reg2.register(HeadwiseCollector(tmp_path / "nothing"))
    assert "headwise_backend_active 0.0" in generate_latest(reg2).decode()
