"""The prompt pool of a load test: the length mix ``TOKENS:WEIGHT,...``, a deterministic schedule,
and the tokenizer that sizes prompts through the server's ``/tokenize``.

Kept apart from the locustfile, which imports locust (and with it gevent's monkey-patching) at
import time: the runner checks a mix without importing that.
"""

from __future__ import annotations

PROMPTS_PER_LENGTH = 8  # distinct needles and depths per length; requests cycle through them


def parse_length_mix(text: str) -> list[tuple[int, float]]:
    """``"1000:0.6,4000:0.4"`` -> ``[(1000, 0.6), (4000, 0.4)]``; a bare ``N`` has weight 1."""
    mix = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        tokens, _, weight = part.partition(":")
        try:
            n, w = int(tokens), float(weight or 1)
        except ValueError:
            raise ValueError(f"--prompt-lengths item {part!r}: expected TOKENS:WEIGHT with an integer "
                             "token count and a number weight, e.g. 2000:0.5") from None
        if n < 1 or not w > 0:
            raise ValueError(f"--prompt-lengths item {part!r}: expected tokens >= 1 and weight > 0")
        mix.append((n, w))
    if not mix:
        raise ValueError(f"--prompt-lengths {text!r}: expected at least one TOKENS:WEIGHT item")
    return mix


class LengthSchedule:
    """Deterministic weighted round robin (smooth: the most under-served length goes next).

    After n picks each length has been chosen ``n * weight / total`` times to within one request
    (checked in the tests), so a short run still sees the configured mix, and the same mix gives
    the same order every run.
    """

    def __init__(self, mix: list[tuple[int, float]]):
        total = sum(w for _, w in mix)
        self.lengths = [n for n, _ in mix]
        self.shares = [w / total for _, w in mix]
        self.credit = [0.0] * len(mix)

    def next(self) -> int:
        self.credit = [c + s for c, s in zip(self.credit, self.shares)]
        i = max(range(len(self.credit)), key=self.credit.__getitem__)
        self.credit[i] -= 1.0
        return self.lengths[i]


class RemoteTokenizer:
    """The ``encode`` that ``headwise.server.commands.tasks`` needs, answered by the server's ``/tokenize``."""

    def __init__(self, host: str, model: str, headers: dict):
        self.url, self.model, self.headers = f"{host}/tokenize", model, headers

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        import requests

        r = requests.post(self.url, json={"model": self.model, "prompt": text,
                                          "add_special_tokens": add_special_tokens},
                          headers=self.headers, timeout=60)
        r.raise_for_status()
        return r.json()["tokens"]
