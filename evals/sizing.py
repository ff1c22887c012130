"""Prompts sized in the served model's tokens: counters and the size search.

A prompt's length is the number of tokens the server will see for the chat request: the chat
template (with its default system message, if it adds one) and the generation prompt included,
i.e. what ``usage.prompt_tokens`` reports. Two counters give it: the model directory's tokenizer
(``TokenizerCounter``) or the server's own ``/tokenize`` route (``ServerCounter``), for when only a
URL is known. ``fit`` searches a task's size knob until the count is within ``TOLERANCE`` of the
target.
"""

from __future__ import annotations

from typing import Callable, Protocol

from .tasks import Draft, Task

TOLERANCE = 0.005  # aim for +-0.5% (the promise is +-1%: a knob step is a few tokens at most)
PROMISE = 0.01


def messages_of(draft: Draft) -> list[dict]:
    return [{"role": "user", "content": draft.text}]


class Counter(Protocol):
    def __call__(self, messages: list[dict]) -> int: ...


class TokenizerCounter:
    """Chat-template tokens under a transformers tokenizer (``AutoTokenizer`` of the model dir)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        tokenizer.model_max_length = 1 << 30  # we count, we do not run: no "longer than the maximum" warning

    @classmethod
    def from_dir(cls, model_dir: str) -> "TokenizerCounter":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_dir))

    def __call__(self, messages: list[dict]) -> int:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)


class ServerCounter:
    """Chat-template tokens as an OpenAI-compatible vLLM server counts them (``POST /tokenize``)."""

    def __init__(self, root_url: str, model: str, api_key: str | None = None, timeout: float = 60.0):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=root_url, headers=headers, timeout=timeout)
        self.model = model

    def __call__(self, messages: list[dict]) -> int:
        r = self.client.post("/tokenize", json={"model": self.model, "messages": messages,
                                                "add_generation_prompt": True})
        if r.status_code != 200:
            raise RuntimeError(f"POST {self.client.base_url}tokenize answered {r.status_code}: {r.text[:300]}")
        return int(r.json()["count"])


def fit(task: Task, seed: int, target: int, count: Callable[[list[dict]], int]) -> tuple[Draft, int]:
    """The draft of ``task`` for ``seed`` whose prompt is closest to ``target`` tokens: ``(draft, tokens)``.

    Secant steps on the size knob (tokens grow about linearly with it), then unit steps; raises
    ``ValueError`` if nothing lands within 1% (a target below the task's fixed text, say).
    """
    tol = max(1, int(target * TOLERANCE))
    seen: dict[int, tuple[Draft, int]] = {}

    def at(n: int) -> int:
        if n not in seen:
            d = task.draft(seed, n)
            seen[n] = (d, count(messages_of(d)))
        return seen[n][1]

    n0 = 0
    t0 = at(n0)  # the fixed part: instructions, needles, question, template
    n1 = max(1, round((target - t0) * task.words_per_token))
    t1 = at(n1)
    for _ in range(12):
        if abs(t1 - target) <= tol or t1 == t0:
            break
        n2 = max(0, round(n1 + (target - t1) * (n1 - n0) / (t1 - t0)))
        if n2 == n1:
            n2 = n1 + (1 if t1 < target else -1)
        n0, t0, n1, t1 = n1, t1, n2, at(n2)
    best = min(seen, key=lambda n: abs(seen[n][1] - target))
    draft, tokens = seen[best]
    if abs(tokens - target) > target * PROMISE:
        raise ValueError(f"{task.name} seed {seed}: the closest prompt has {tokens} tokens, target {target} "
                         f"(outside +-1%)")
    return draft, tokens
