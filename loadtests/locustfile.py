"""Locust users that chat with an OpenAI-compatible server using long prompts, streamed.

Each request is a passkey-in-a-haystack chat message of a length drawn from a configurable mix,
sent with ``stream=true``. Besides the request itself (its locust response time is the *whole*
streamed response, not just the headers), every request reports two custom metrics:

* ``TTFT``: time from sending the request to the first content token;
* ``ITL``: the request's mean inter-token latency, (last token - first token) / (tokens - 1).

Run it through ``headwise loadtest`` / ``loadtests/run.py`` (headless, CSV + summary + plots), or
directly: ``locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --prompt-lengths 2000:1``.

Options (also ``LOCUST_*`` environment variables): ``--prompt-lengths`` ``TOKENS:WEIGHT,...``;
``--max-tokens``; ``--model`` (default: the server's first model); ``--api-key``;
``--samples-file`` (one JSON line per request, what the runner's summary and plots are made from);
``--allow-eos`` (stop at end of sequence instead of always generating ``--max-tokens``).
Prompts are built once at test start with the server's own tokenizer (its ``/tokenize``
endpoint), so lengths are in the served model's tokens; each user message starts with a unique
line so that the prefix cache can share no more than the chat template's fixed preamble between
requests.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid

import gevent
import requests
from locust import HttpUser, between, events, task
from locust.exception import StopUser

from headwise.loadtests.mix import PROMPTS_PER_LENGTH, LengthSchedule, RemoteTokenizer, parse_length_mix
from headwise.server.commands.tasks import passkey

TEMPLATE_MARGIN = 64  # tokens the chat template and the unique first line may add to a prompt


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--prompt-lengths", default="1000:1", env_var="LOCUST_PROMPT_LENGTHS",
                        help="prompt length mix in tokens: TOKENS:WEIGHT,... e.g. 1000:0.6,4000:0.3,8000:0.1")
    parser.add_argument("--max-tokens", type=int, default=64, env_var="LOCUST_MAX_TOKENS",
                        help="tokens generated per request")
    parser.add_argument("--model", default="", env_var="LOCUST_MODEL", help="model name (default: the server's first)")
    parser.add_argument("--api-key", default="", env_var="LOCUST_API_KEY", is_secret=True,
                        help="bearer token for --api-key servers")
    parser.add_argument("--samples-file", default="", env_var="LOCUST_SAMPLES_FILE",
                        help="append one JSON line per request to this file")
    parser.add_argument("--allow-eos", action="store_true", default=False,
                        help="let requests stop at end of sequence (default: always generate --max-tokens)")
    parser.add_argument("--request-timeout", type=int, default=600, env_var="LOCUST_REQUEST_TIMEOUT",
                        help="seconds a request may wait for the server's next byte before it fails")


class _Shared:
    """What every user reads: built once per test at test start."""

    model: str = ""
    headers: dict = {}
    prompts: dict[int, itertools.cycle] = {}
    schedule: LengthSchedule | None = None
    samples = None  # open file or None


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    try:
        _prepare(environment)
    except Exception as exc:  # without prompts no user can run: stop the test and say why
        logging.error("headwise locustfile: could not prepare the prompts: %s", exc)
        environment.process_exit_code = 2
        if environment.runner is not None:
            gevent.spawn(environment.runner.quit)


def _prepare(environment) -> None:
    opts = environment.parsed_options
    host = environment.host.rstrip("/")
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    models = requests.get(f"{host}/v1/models", headers=headers, timeout=30)
    models.raise_for_status()
    cards = models.json()["data"]
    model = opts.model or cards[0]["id"]
    card = next((c for c in cards if c["id"] == model), {})
    mix = parse_length_mix(opts.prompt_lengths)
    limit = card.get("max_model_len")
    for n, _ in mix:
        if limit and n + opts.max_tokens + TEMPLATE_MARGIN > limit:
            raise ValueError(f"--prompt-lengths {n} + --max-tokens {opts.max_tokens} (+{TEMPLATE_MARGIN} for the "
                             f"chat template) exceeds the server's max_model_len {limit}")
    tokenizer = RemoteTokenizer(host, model, headers)
    _Shared.prompts = {n: itertools.cycle([passkey(tokenizer, n, seed=s) for s in range(PROMPTS_PER_LENGTH)])
                       for n, _ in mix}
    _Shared.model, _Shared.headers = model, headers
    _Shared.schedule = LengthSchedule(mix)
    _Shared.samples = open(opts.samples_file, "a") if opts.samples_file else None


@events.test_stop.add_listener
def _finish(environment, **_kw) -> None:
    if _Shared.samples is not None:
        _Shared.samples.close()
        _Shared.samples = None


def _read_stream(resp, arrivals: list[float], text: list[str], usage: dict) -> str:
    """Consume an SSE chat stream: content arrival times and text, the usage; returns an error or ''."""
    if resp.status_code != 200:
        return f"HTTP {resp.status_code}: {resp.text[:300]}"
    for line in resp.iter_lines():
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):]
        if data == b"[DONE]":
            return "" if arrivals else "the stream carried no content"
        chunk = json.loads(data)
        usage.update(chunk.get("usage") or {})
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                arrivals.append(time.perf_counter())
                text.append(piece)
    return "the stream ended without [DONE]"


class LongPromptChatUser(HttpUser):
    wait_time = between(0.0, 0.5)

    @task
    def chat(self) -> None:
        if _Shared.schedule is None:
            raise StopUser()  # test start failed (its error is in the log)
        opts = self.environment.parsed_options
        length = _Shared.schedule.next()
        item = next(_Shared.prompts[length])
        body = {
            "model": _Shared.model,
            "messages": [{"role": "user", "content": f"Request {uuid.uuid4().hex[:12]}.\n{item.prompt}"}],
            "max_tokens": opts.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": not opts.allow_eos,  # vLLM extension: fixed output lengths make runs comparable
        }
        name = f"chat len={length}"
        started = time.perf_counter()
        arrivals: list[float] = []
        text: list[str] = []
        usage: dict = {}
        with self.client.post("/v1/chat/completions", json=body, headers=_Shared.headers, stream=True,
                              catch_response=True, name=name, timeout=opts.request_timeout) as resp:
            try:
                error = _read_stream(resp, arrivals, text, usage)
            except Exception as exc:  # a broken chunk is this request's failure, not the user's end
                error = f"{type(exc).__name__}: {exc}"
            e2e_ms = (time.perf_counter() - started) * 1000
            resp.request_meta["response_time"] = e2e_ms  # the whole streamed answer, not the headers
            resp.request_meta["response_length"] = len("".join(text))
            if error:
                resp.failure(error)
            else:
                resp.success()
        sample = {"time": time.time(), "model": _Shared.model, "target_tokens": length,
                  "ok": not error, "error": error, "e2e_ms": e2e_ms, "prompt_tokens": usage.get("prompt_tokens"),
                  "completion_tokens": usage.get("completion_tokens"), "ttft_ms": None, "itl_ms": None,
                  "chunks": len(arrivals), "correct": item.grade("".join(text)) if not error else None,
                  "answer": item.answer}  # which prompt it was (the soak compares it with an unloaded run)
        if not error:
            sample["ttft_ms"] = (arrivals[0] - started) * 1000
            fire = self.environment.events.request.fire
            fire(request_type="TTFT", name=name, response_time=sample["ttft_ms"], response_length=0,
                 exception=None, context={})
            tokens = usage.get("completion_tokens") or len(arrivals)
            if tokens > 1:  # a chunk may carry several tokens: spread the gap over the true count
                sample["itl_ms"] = (arrivals[-1] - arrivals[0]) * 1000 / (tokens - 1)
                fire(request_type="ITL", name=name, response_time=sample["itl_ms"], response_length=0,
                     exception=None, context={})
        if _Shared.samples is not None:
            _Shared.samples.write(json.dumps(sample) + "\n")
            _Shared.samples.flush()
