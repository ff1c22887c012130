"""Hostile and generated requests against a real `headwise serve`: never a 5xx, healthy afterwards.

Two parts on one server (conftest's ``small_server``: default plan, headwise on, 2048-token context,
shared with the fault tests):

* hand-written hostile cases: huge ``length`` / ``max_tokens`` / ``n`` / ``logprobs``, prompts far
  over the context, deeply nested JSON, wrong types, broken bodies;
* a property-based fuzz (hypothesis) of every route the server's ``/openapi.json`` lists for the
  headwise and OpenAI paths: bodies built from JSON values of any shape mixed with near-valid
  requests, bounded by ``FUZZ_BUDGET_S``.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servers import SMALL_CONTEXT as CONTEXT

pytestmark = pytest.mark.server

MODEL = "SmolLM2-135M-Instruct"
FUZZ_BUDGET_S = 75.0
BIG = [10**6, 10**10, 10**19, 2**63, -1, 0, 1.5, "9" * 400]


@pytest.fixture(scope="module")
def server(small_server):
    return small_server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:500]}"
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        assert "error" in body or "detail" in body, f"{what}: error body without a message: {body}"


def _chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


HOSTILE: list[tuple[str, str, object]] = [
    *[("GET", f"/v1/headwise/plan?length={v}", None) for v in BIG],
    ("GET", "/v1/headwise/plan?length=abc", None),
    ("GET", "/v1/headwise/plan?length=", None),
    ("GET", "/v1/headwise/plan?length=1&length=2", None),
    ("GET", "/v1/headwise/stats?x=" + "y" * 10000, None),
    *[("POST", "/v1/chat/completions", _chat(max_tokens=v)) for v in BIG],
    *[("POST", "/v1/chat/completions", _chat(n=v)) for v in BIG],
    *[("POST", "/v1/chat/completions", _chat(logprobs=True, top_logprobs=v)) for v in BIG],
    *[("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "logprobs": v}) for v in BIG],
    *[("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "best_of": v}) for v in BIG],
    ("POST", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "word " * 20000}])),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": [1] * 100_000, "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": [[1] * 3000] * 8, "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": [10**12], "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": [-5], "max_tokens": 2}),
    ("POST", "/v1/chat/completions", _chat(messages="hi")),
    ("POST", "/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": 3}])),
    ("POST", "/v1/chat/completions", _chat(temperature="hot", top_p=[], stop={"a": 1})),
    ("POST", "/v1/chat/completions", _chat(temperature=10**9, top_p=-3, top_k=-10**9)),
    ("POST", "/v1/chat/completions", _chat(stop=["x"] * 10000)),
    ("POST", "/v1/chat/completions", _chat(logit_bias={str(i): 100 for i in range(5000)})),
    ("POST", "/v1/chat/completions", _chat(seed=2**80)),
    ("POST", "/v1/chat/completions", _chat(stream="yes")),
    ("POST", "/v1/chat/completions", _chat(model=None)),
    ("POST", "/v1/chat/completions", []),
    ("POST", "/v1/chat/completions", "null"),
    ("POST", "/v1/chat/completions", b"{" * 100_000),
    ("POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
    ("POST", "/v1/chat/completions", ('{"model": "%s", "messages": ' % MODEL + "[" * 50_000 + "]" * 50_000 + "}").encode()),
    ("POST", "/v1/chat/completions", b"\xff\xfe not json"),
    ("POST", "/v1/chat/completions", b""),
    ("POST", "/tokenize", {"model": MODEL, "prompt": "x" * 200_000}),
    ("POST", "/tokenize", {"model": MODEL, "messages": 5}),
    ("POST", "/detokenize", {"model": MODEL, "tokens": [10**12, -1]}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "hi"}),
]


@pytest.mark.parametrize("method,path,body", HOSTILE, ids=[f"{m} {p[:60]} #{i}" for i, (m, p, _) in enumerate(HOSTILE)])
def test_hostile_request_is_answered_without_a_5xx(server, http, method, path, body):
    if isinstance(body, bytes):  # raw bytes: sent as they are
        kw = {"content": body, "headers": {"content-type": "application/json"}}
    elif body is None:
        kw = {}
    else:
        kw = {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}
    r = http.request(method, path, **kw)
    _check(r, f"{method} {path} {str(body)[:200]}")
    assert server.healthy()


def test_plan_route_names_the_allowed_range(http):
    r = http.get("/v1/headwise/plan", params={"length": 10**10})
    assert r.status_code == 400 and f"1..{CONTEXT}" in r.json()["error"]["message"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
FIELDS = ["model", "messages", "prompt", "max_tokens", "n", "logprobs", "top_logprobs", "temperature", "top_p",
          "stop", "stream", "seed", "best_of", "echo", "presence_penalty", "max_completion_tokens", "tools",
          "response_format", "stream_options", "tokens", "input", "length"]


@st.composite
def bodies(draw):
    """A near-valid request with some fields replaced by arbitrary JSON, or arbitrary JSON."""
    if draw(st.booleans()):
        return draw(json_values)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 2}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        body[name] = draw(json_values)
    return body


def _routes(http) -> list[tuple[str, str]]:
    spec = http.get("/openapi.json").json()
    routes = []
    for path, ops in spec["paths"].items():
        if "{" in path or not (path.startswith(("/v1/", "/tokenize", "/detokenize"))):
            continue
        if any(x in path for x in ("audio", "load_lora", "unload_lora", "realtime", "/responses/")):
            continue  # multipart uploads, adapters, websockets and stored responses: not this server's features
        for method in ops:
            if method in ("get", "post"):
                routes.append((method.upper(), path))
    return routes


def test_fuzz_every_route_from_openapi_without_a_5xx(server, http):
    routes = _routes(http)
    assert ("GET", "/v1/headwise/plan") in routes and ("POST", "/v1/chat/completions") in routes, routes
    deadline = time.monotonic() + FUZZ_BUDGET_S
    seen: dict[int, int] = {}

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(routes), body=bodies(), query=st.dictionaries(
        st.sampled_from(["length", "x", "model"]), st.text(max_size=20) | st.integers().map(str), max_size=2))
    def one(route, body, query):
        if time.monotonic() > deadline:
            return
        method, path = route
        if method == "GET":
            r = http.get(path, params=query)
        else:
            r = http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        _check(r, f"{method} {path} {json.dumps(body)[:300]} {query}")

    one()
    assert sum(seen.values()) >= 50, f"too few fuzz cases ran in {FUZZ_BUDGET_S}s: {seen}"
    assert server.healthy()
    r = http.post("/v1/chat/completions", json=_chat(max_tokens=4))
    assert r.status_code == 200, r.text
    print(f"fuzz: {sum(seen.values())} requests over {len(routes)} routes, statuses {seen}")
