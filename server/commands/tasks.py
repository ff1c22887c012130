"""Synthetic long-context tasks made from a seed (no downloads): RULER-style retrieval prompts.

Used by the profiler (calibration prompts), the accuracy harness in ``evals/``, the end-to-end
benchmarks and the tests. Every task is a chat message whose answer is a short string that the
grader looks for in the model's reply. Lengths are in tokens of the given tokenizer; the filler is
grown until the prompt reaches the target, then the needle is placed at the requested depth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

# Filler sentences with no digits, so a number in the haystack can only be the needle.
_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
    "A quiet river runs past the old mill, and the miller counts sacks of grain at dusk. ",
    "Clouds drift over the hills while a shepherd walks the long path home with his dog. ",
    "The library keeps its oldest maps in a cool room where nobody is allowed to eat. ",
)
_WORDS = ("apple", "river", "stone", "cloud", "maple", "ember", "harbor", "violet", "meadow", "falcon")


# The profiler's calibration prompts use seeds from this range only; the eval suite
# (``headwise.evals.EVAL_SEEDS``) starts at 1,000,000, so the two never share a seed.
CALIBRATION_SEEDS = range(0, 1_000_000)


def calibration_seed(base: int, index: int) -> int:
    """Seed of calibration prompt ``index`` for ``--seed base``: ``base * 1000 + index``, checked to
    lie in ``CALIBRATION_SEEDS``."""
    seed = base * 1000 + index
    if not 0 <= index < 1000 or seed not in CALIBRATION_SEEDS:
        raise ValueError(f"calibration seed {seed} (--seed {base}, prompt {index}) is outside "
                         f"{CALIBRATION_SEEDS.start}..{CALIBRATION_SEEDS.stop - 1}: use --seed below 1000")
    return seed


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str  # the user message
    answer: str  # what a correct reply contains
    n_tokens: int  # prompt tokens (user message only) under the tokenizer used

    def grade(self, reply: str) -> bool:
        return self.answer in reply


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _haystack(tokenizer, n_tokens: int, rng: random.Random, reserve: int) -> list[str]:
    """Filler sentences totalling about ``n_tokens - reserve`` tokens."""
    sentences: list[str] = []
    per = {s: _count(tokenizer, s) for s in _FILLER}
    total = 0
    budget = max(0, n_tokens - reserve)
    while True:
        s = _FILLER[rng.randrange(len(_FILLER))] if rng.random() < 0.3 else _FILLER[0]
        if total + per[s] > budget:
            break
        sentences.append(s)
        total += per[s]
    return sentences


def _with_needle(tokenizer, n_tokens: int, depth: float, rng: random.Random,
                 needle: str, question: str) -> str:
    reserve = _count(tokenizer, needle) + _count(tokenizer, question) + 16
    hay = _haystack(tokenizer, n_tokens, rng, reserve)
    at = min(len(hay), max(0, round(depth * len(hay))))
    hay.insert(at, needle + " ")
    intro = "There is important information hidden in the following text. Find it and remember it.\n\n"
    return intro + "".join(hay) + "\n\n" + question


def passkey(tokenizer, n_tokens: int, seed: int = 0, depth: float | None = None) -> Task:
    """Find a five-digit pass key hidden at ``depth`` (0 = start, 1 = end) of repeated filler."""
    rng = random.Random(seed)
    key = str(rng.randrange(10_000, 100_000))
    depth = rng.random() if depth is None else depth
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "What is the pass key? Answer with the number only."
    prompt = _with_needle(tokenizer, n_tokens, depth, rng, needle, question)
    return Task("passkey", prompt, key, _count(tokenizer, prompt))


def kv_retrieval(tokenizer, n_tokens: int, seed: int = 0, depth: float | None = None) -> Task:
    """Single-key needle: the magic number for a word, among filler."""
    rng = random.Random(seed)
    word = rng.choice(_WORDS)
    value = str(rng.randrange(1_000_000, 10_000_000))
    depth = rng.random() if depth is None else depth
    needle = f"One of the special magic numbers for {word} is: {value}."
    question = f"What is the special magic number for {word} mentioned in the text? Answer with the number only."
    prompt = _with_needle(tokenizer, n_tokens, depth, rng, needle, question)
    return Task("kv_retrieval", prompt, value, _count(tokenizer, prompt))


def variable_tracking(tokenizer, n_tokens: int, seed: int = 0, hops: int = 3) -> Task:
    """A chain of assignments VAR_A = 12345, VAR_B = VAR_A, ... spread through filler."""
    rng = random.Random(seed)
    value = str(rng.randrange(10_000, 100_000))
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    question = f"Which number does VAR {names[-1]} hold in the end? Answer with the number only."
    reserve = sum(_count(tokenizer, s) for s in lines) + _count(tokenizer, question) + 16
    hay = _haystack(tokenizer, n_tokens, rng, reserve)
    slots = sorted(rng.sample(range(len(hay) + 1), k=len(lines))) if len(hay) + 1 >= len(lines) else list(range(len(lines)))
    for offset, (slot, line) in enumerate(zip(slots, lines)):
        hay.insert(slot + offset, line + " ")
    prompt = "Memorize the variable assignments in the following text.\n\n" + "".join(hay) + "\n\n" + question
    return Task("variable_tracking", prompt, value, _count(tokenizer, prompt))


TASKS: dict[str, Callable[..., Task]] = {
    "passkey": passkey,
    "kv_retrieval": kv_retrieval,
    "variable_tracking": variable_tracking,
}


def make_task(name: str, tokenizer, n_tokens: int, seed: int = 0) -> Task:
    try:
        return TASKS[name](tokenizer, n_tokens, seed=seed)
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None
