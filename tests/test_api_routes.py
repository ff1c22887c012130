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
        assert client.get("/v1/headwise/plan", params={"length": -5}).status_code == 422  # FastAPI's own


def test_stats_before_any_worker_published_say_the_backend_is_not_active(app_client):
    with app_client(enabled=True) as client:
        stats = client.get("/v1/headwise/stats").json()
        assert stats["object"] == "headwise.stats" and stats["backend_active"] is False
        assert stats["workers"] == [] and stats["attention_calls"] == 0
    # the collector joined the process registry that vLLM's /metrics serves
    assert b"headwise_backend_active" in generate_latest(REGISTRY)
