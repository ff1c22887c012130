"""The headwise routes and metrics middleware on a plain FastAPI app (no engine): fast checks of
what `test_api.py` sees through a live server, plus the paths a live server with headwise on
cannot show (headwise off, no worker has published yet)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest

from headwise.server.commands.routes import HeadwiseRoutes

PLAN = Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m-instruct" / "sparse.json"


@pytest.fixture
def app_client(monkeypatch, tmp_path):
    def make(enabled: bool):
        monkeypatch.setenv("HEADWISE_STATS_DIR", str(tmp_path))
        if enabled:
            monkeypatch.setenv("HEADWISE_ENABLE", "1")
            monkeypatch.setenv("HEADWISE_PLAN", str(PLAN))
        else:
            monkeypatch.delenv("HEADWISE_ENABLE", raising=False)
        app = FastAPI()
        app.add_middleware(HeadwiseRoutes)  # what vLLM does with --middleware
        return TestClient(app)

    return make


def test_routes_answer_404_in_openai_error_shape_when_headwise_is_off(app_client):
    with app_client(enabled=False) as client:  # `with` runs the lifespan, where the routes attach
        for path in ("/v1/headwise/plan", "/v1/headwise/stats"):
            r = client.get(path)
            assert r.status_code == 404
            assert r.json()["error"]["type"] == "NotFoundError" and "--no-headwise" in r.json()["error"]["message"]


def test_plan_route_without_an_engine_config_defaults_to_8192_tokens(app_client):
    with app_client(enabled=True) as client:
        plan = client.get("/v1/headwise/plan").json()
        assert plan["length"] == 8192 and plan["plan"] == str(PLAN) and len(plan["layers"]) == 30
        short = client.get("/v1/headwise/plan", params={"length": 100}).json()
        assert short["expected_density"] == {"prefill": 1.0, "decode": 1.0}  # below dense_below
        for bad in (-5, 0, 8193, 10**10):
            r = client.get("/v1/headwise/plan", params={"length": bad})
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["type"] == "BadRequestError" and "1..8192" in r.json()["error"]["message"]
        assert client.get("/v1/headwise/plan", params={"length": "ten"}).status_code == 422  # FastAPI's own


def test_stats_before_any_worker_published_say_the_backend_is_not_active(app_client):
    with app_client(enabled=True) as client:
        stats = client.get("/v1/headwise/stats").json()
        assert stats["object"] == "headwise.stats" and stats["backend_active"] is False
        assert stats["workers"] == [] and stats["attention_calls"] == 0
    # the collector joined the process registry that vLLM's /metrics serves
    assert b"headwise_backend_active" in generate_latest(REGISTRY)


# One request of /v1/headwise/plan?length=L in a fresh interpreter whose app claims a context of
# 2^40 tokens (so the route's own bound lets every L through): prints the wall time of the request
# and how far the process's peak resident memory rose above what it held before the request.
_PROBE = r"""
import os, resource, sys, time, types
os.environ.update(HEADWISE_ENABLE="1", HEADWISE_PLAN=sys.argv[1], HEADWISE_STATS_DIR=sys.argv[2])
from fastapi import FastAPI
from fastapi.testclient import TestClient
from headwise.server.commands.routes import HeadwiseRoutes
import psutil
app = FastAPI()
app.add_middleware(HeadwiseRoutes)
app.state.vllm_config = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=2**40))
with TestClient(app) as client:
    assert client.get("/v1/headwise/plan", params={"length": 4096}).status_code == 200  # imports, warm-up
    before = psutil.Process().memory_info().rss
    # never more than 2 GiB more address space: an allocation that grows with L fails here, not the box
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), hard))
    t = time.perf_counter()
    r = client.get("/v1/headwise/plan", params={"length": int(sys.argv[3])})
    took = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(r.status_code, took, max(0, peak - before))
"""


def _probe(length: int, tmp_path) -> tuple[int, float, int]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PROBE, str(PLAN), str(tmp_path), str(length)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    code, took, grew = out.stdout.split()
    return int(code), float(took), int(grew)


def test_plan_route_time_and_memory_do_not_depend_on_length(tmp_path):
    """The request that OOM-killed the server (length=10^10) costs what length=8192 costs."""
    results = {n: _probe(n, tmp_path) for n in (8192, 10**6, 10**10, 10**12)}
    assert all(code == 200 for code, _, _ in results.values()), results
    base_t, base_m = results[8192][1], results[8192][2]
    for n, (_, took, grew) in results.items():
        assert took < max(0.5, 5 * base_t), f"length {n}: {took:.3f}s vs {base_t:.3f}s at 8192 ({results})"
        assert grew < base_m + (16 << 20), f"length {n}: peak RSS +{grew >> 20} MiB vs +{base_m >> 20} MiB ({results})"
