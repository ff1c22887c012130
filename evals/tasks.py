"""The suite's tasks: each turns ``(seed, size)`` into one chat prompt with its expected answers.

A task's ``draft(seed, n)`` is deterministic: everything the answer depends on (keys, values,
depths) is drawn first from ``Random(f"{task}:{seed}")``, so it is the same at every length; the
haystack comes from a second stream, of which a prompt of size ``n`` takes the first ``n`` words
(list items for ``cwe``). ``sizing.fit`` searches ``n`` so the prompt has the requested number of
tokens. Each draft also names its *distractors*: values in the prompt that are not the answer
(other keys' values, a second variable chain, rare words), which the scorer counts against a reply.

| task | haystack | what is hidden | question |
|---|---|---|---|
| niah_single | repeated passage | one 7-digit number | its key's number |
| niah_word | varied prose | one two-word value | its key's value |
| niah_uuid | varied prose | one UUID-like value | its key's value |
| niah_multikey | varied prose | 4 keys' numbers (3 distractors) | one key's number |
| niah_multivalue | varied prose | 4 numbers under one key, 1 distractor key | all four |
| niah_multiquery | varied prose | 4 keys' numbers | all four keys at once |
| vt | repeated passage | a 4-hop chain of assignments and a distractor chain | every variable holding the value |
| cwe | a numbered word list | 10 made-up words said 12 times, the rest at most 3 | the 10 common words |
| fwe | Zipf-distributed made-up words | (word frequencies) | the 3 most frequent words |
| qa | generated town documents | one document asked about | a fact from it |
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from . import filler


@dataclass(frozen=True)
class Draft:
    """One prompt before sizing: the user message and how to score the reply."""

    text: str
    expected: tuple[str, ...]
    distractors: tuple[str, ...] = ()
    kind: str = "text"  # number | uuid | text: how a value is matched in a reply (see score.py)
    depths: tuple[float, ...] = ()  # where the answers sit (0 = start, 1 = end), for the record


@dataclass(frozen=True)
class Task:
    name: str
    draft: Callable[[int, int], Draft]  # (seed, size) -> Draft
    max_tokens: int  # generation budget: enough for the full answer
    words_per_token: float  # first guess for the size search (size units per prompt token)
    about: str


def _rngs(task: str, seed: int) -> tuple[random.Random, random.Random]:
    """(answer rng, haystack rng): string seeds hash deterministically (random's version 2)."""
    return random.Random(f"{task}:{seed}"), random.Random(f"{task}:{seed}:haystack")


def _haystack(units: list[list[str]], inserts: list[tuple[float, str]]) -> str:
    """Join the units' words, placing each ``(depth, sentence)`` at the unit boundary nearest to
    ``depth`` of the haystack (inserts at the same boundary keep their order)."""
    at: dict[int, list[str]] = {}
    for depth, sentence in inserts:
        at.setdefault(min(len(units), round(depth * len(units))), []).append(sentence)
    parts: list[str] = []
    for i in range(len(units) + 1):
        parts.extend(at.get(i, ()))
        if i < len(units):
            parts.append(" ".join(units[i]))
    return " ".join(p for p in parts if p)


# ------------------------------------------------------------------------ needles
_NOUN = {"number": "number", "word": "word", "uuid": "UUID"}
_KIND = {"number": "number", "word": "text", "uuid": "uuid"}


def _niah(name: str, *, haystack: str, value: str, distractor_keys: int = 0, values: int = 1,
          queries: int = 1) -> Callable[[int, int], Draft]:
    noun = _NOUN[value]

    def draft(seed: int, n: int) -> Draft:
        rng, hay_rng = _rngs(name, seed)
        taken: set[str] = set()
        keys = [filler.compound(rng, taken) for _ in range(queries + distractor_keys)]
        asked, others = keys[:queries], keys[queries:]
        answers = {k: [filler.VALUES[value](rng, taken) for _ in range(values)] for k in asked}
        wrong = {k: filler.VALUES[value](rng, taken) for k in others}
        needles = [(k, v) for k in asked for v in answers[k]] + list(wrong.items())
        rng.shuffle(needles)
        depths = [rng.random() for _ in needles]
        inserts = [(d, f"One of the special magic {noun}s for {k} is: {v}.") for d, (k, v) in zip(depths, needles)]
        units = filler.words_of(filler.FILLERS[haystack](hay_rng), n)
        if queries == 1 and values == 1:
            question = (f"What is the special magic {noun} for {asked[0]} mentioned in the text above? "
                        f"Answer with the {noun} only.")
        elif queries == 1:
            question = (f"What are all the special magic {noun}s for {asked[0]} mentioned in the text above? "
                        f"Answer with the {noun}s only, separated by commas.")
        else:
            listed = ", ".join(asked[:-1]) + f" and {asked[-1]}"
            question = (f"What are the special magic {noun}s for {listed} mentioned in the text above? "
                        f"Answer with the {noun}s only, separated by commas.")
        text = (f"A long text follows. Some special magic {noun}s are hidden in it: memorize them, you will "
                f"be asked about them afterwards.\n\n{_haystack(units, inserts)}\n\n{question}")
        expected = tuple(v for k in asked for v in answers[k])
        hit_depths = tuple(d for d, (k, _) in zip(depths, needles) if k in answers)
        return Draft(text, expected, tuple(wrong.values()), _KIND[value], hit_depths)

    return draft


# ------------------------------------------------------------- variable tracking
def _var_name(rng: random.Random, taken: set[str]) -> str:
    return filler._fresh(lambda: "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)), taken)


def _vt(seed: int, n: int, hops: int = 4) -> Draft:
    rng, hay_rng = _rngs("vt", seed)
    names: set[str] = set()
    values: set[str] = set()

    def chain() -> tuple[str, list[str], list[str]]:
        value = str(rng.randrange(10_000, 100_000))
        while value in values:
            value = str(rng.randrange(10_000, 100_000))
        values.add(value)
        vars_ = [_var_name(rng, names) for _ in range(hops + 1)]
        lines = [f"VAR {vars_[0]} = {value}."] + [f"VAR {vars_[i + 1]} = VAR {vars_[i]}." for i in range(hops)]
        return value, vars_, lines

    value, target, lines = chain()
    _, other, other_lines = chain()
    inserts = []
    for chain_lines in (lines, other_lines):  # each chain in order: a variable is set before it is used
        inserts += list(zip(sorted(rng.random() for _ in chain_lines), chain_lines))
    inserts.sort(key=lambda x: x[0])
    units = filler.words_of(filler.FILLERS["repeated"](hay_rng), n)
    question = (f"Which variables are assigned the value {value}, directly or through other variables? "
                f"Answer with every such variable name, separated by commas.")
    text = (f"Memorize the variable assignments hidden in the following text; you will be asked to follow "
            f"them.\n\n{_haystack(units, inserts)}\n\n{question}")
    return Draft(text, tuple(target), tuple(other), "text", tuple(d for d, l in inserts if l in lines))


# ---------------------------------------------------------- word-frequency tasks
_CWE_COMMON, _CWE_REPEATS, _CWE_RARE = 10, 12, 3


def _cwe(seed: int, n: int) -> Draft:
    """10 common words x 12 and ``n`` more list items of rare words (3 times each; the last may be fewer)."""
    rng, list_rng = _rngs("cwe", seed)
    taken: set[str] = set()
    common = [filler.made_up_word(rng, taken) for _ in range(_CWE_COMMON)]
    items = [w for w in common for _ in range(_CWE_REPEATS)]
    rare: list[str] = []
    size = len(items) + n
    while len(items) < size:
        rare.append(filler.made_up_word(list_rng, taken))
        items += [rare[-1]] * min(_CWE_RARE, size - len(items))
    list_rng.shuffle(items)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    question = (f"What are the {_CWE_COMMON} most common words in the list above? Answer with the words only, "
                f"separated by commas.")
    text = (f"Below is a numbered list of words. A few of them occur far more often than the others.\n\n"
            f"{listing}\n\n{question}")
    return Draft(text, tuple(common), tuple(rare), "text")


_FWE_VOCAB, _FWE_ALPHA = 120, 1.3


def _fwe(seed: int, n: int) -> Draft:
    """``n`` words whose counts follow Zipf's law (rank r ~ r^-1.3) over 120 made-up words."""
    rng, text_rng = _rngs("fwe", seed)
    taken: set[str] = set()
    vocab = [filler.made_up_word(rng, taken) for _ in range(_FWE_VOCAB)]
    weights = [(r + 1) ** -_FWE_ALPHA for r in range(_FWE_VOCAB)]
    total = sum(weights)
    counts = [int(n * w / total) for w in weights]
    for r in range(n - sum(counts)):  # the rounding remainder goes to the rarest words
        counts[-1 - (r % _FWE_VOCAB)] += 1
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    text_rng.shuffle(words)
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    question = "What are the three most frequent words in the coded text above? Answer with the three words only."
    text = ("Read the following coded text and track how often each word occurs.\n\n"
            + "\n".join(lines) + f"\n\n{question}")
    ranked = sorted(range(_FWE_VOCAB), key=lambda r: -counts[r])
    return Draft(text, tuple(vocab[r] for r in ranked[:3]), tuple(vocab[r] for r in ranked[3:10]), "text")


# --------------------------------------------------------------- retrieval QA
_TRADES = ("weaver", "miller", "shipwright", "potter", "glassblower", "tanner", "cooper", "mason", "brewer", "smith")
_GOODS = ("copper", "wool", "salted fish", "glassware", "cider", "timber", "slate", "linen", "honey", "rope")
_SETTINGS = ("in a narrow valley", "on a rocky coast", "beside a wide lake", "at the foot of a mountain",
             "on a windy plateau", "among low hills", "at the mouth of a river", "on the edge of a forest")


def _proper(rng: random.Random, taken: set[str]) -> str:
    return filler.made_up_word(rng, taken).capitalize()


def _town(rng: random.Random, taken: set[str], years: set[str]) -> dict[str, str]:
    year = filler._fresh(lambda: str(rng.randrange(1100, 1900)), years)
    return {"town": _proper(rng, taken), "year": year, "trade": rng.choice(_TRADES), "goods": rng.choice(_GOODS),
            "setting": rng.choice(_SETTINGS), "mayor": f"{_proper(rng, taken)} {_proper(rng, taken)}",
            "twin": _proper(rng, taken)}


def _document(d: dict[str, str]) -> str:
    return (f"{d['town']} is a small town {d['setting']}. It was founded in {d['year']} by a {d['trade']}. "
            f"The town is known for its {d['goods']}. Its current mayor is {d['mayor']}. "
            f"{d['town']} is twinned with the town of {d['twin']}.")


_QUESTIONS = {
    "year": ("In which year was the town of {town} founded? Answer with the year only.", "number"),
    "mayor": ("Who is the current mayor of {town}? Answer with the name only.", "text"),
    "twin": ("Which town is {town} twinned with? Answer with the town's name only.", "text"),
}


def _qa(seed: int, n: int) -> Draft:
    """Town documents (``n`` words of them) with one asked about, placed at a random depth."""
    rng, docs_rng = _rngs("qa", seed)
    taken: set[str] = set()
    years: set[str] = set()
    gold = _town(rng, taken, years)
    field = rng.choice(sorted(_QUESTIONS))
    depth = rng.random()

    def docs():
        while True:
            yield _document(_town(docs_rng, taken, years))

    others = filler.words_of(docs(), n)
    at = min(len(others), round(depth * len(others)))
    bodies = [" ".join(w) for w in others[:at]] + [_document(gold)] + [" ".join(w) for w in others[at:]]
    listing = "\n\n".join(f"Document {i + 1}: {b}" for i, b in enumerate(bodies))
    template, kind = _QUESTIONS[field]
    question = template.format(town=gold["town"])
    text = (f"Answer the question using the documents below.\n\n{listing}\n\nQuestion: {question}")
    # the same field of the other (whole) documents is what a confused reply would give
    wrong = tuple(sorted({v for v in _field_values(bodies, field, gold)}))
    return Draft(text, (gold[field],), wrong, kind, (depth,))


def _field_values(bodies: list[str], field: str, gold: dict[str, str]) -> set[str]:
    import re

    pattern = {"year": r"founded in (\d{4})", "mayor": r"mayor is ([A-Z][a-z]+ [A-Z][a-z]+)\.",
               "twin": r"town of ([A-Z][a-z]+)\."}[field]
    return {m for b in bodies for m in re.findall(pattern, b)} - {gold[field]}


# --------------------------------------------------------------------- registry
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("niah_single", _niah("niah_single", haystack="repeated", value="number"), 24, 0.8,
         "one number in a repeated passage"),
    Task("niah_word", _niah("niah_word", haystack="varied", value="word"), 24, 0.8,
         "one two-word value in varied prose"),
    Task("niah_uuid", _niah("niah_uuid", haystack="varied", value="uuid"), 40, 0.8,
         "one UUID-like value in varied prose"),
    Task("niah_multikey", _niah("niah_multikey", haystack="varied", value="number", distractor_keys=3), 24, 0.8,
         "one key's number among three distractor needles"),
    Task("niah_multivalue", _niah("niah_multivalue", haystack="varied", value="number", values=4,
                                  distractor_keys=1), 64, 0.8, "all four numbers of one key"),
    Task("niah_multiquery", _niah("niah_multiquery", haystack="varied", value="number", queries=4), 64, 0.8,
         "the numbers of four keys asked at once"),
    Task("vt", _vt, 48, 0.8, "variable tracking: a 4-hop chain and a distractor chain"),
    Task("cwe", _cwe, 64, 0.25, "the 10 most common words of a list"),
    Task("fwe", _fwe, 24, 0.35, "the 3 most frequent words of Zipf-distributed text"),
    Task("qa", _qa, 24, 0.7, "a fact from one of many generated documents"),
)}


def task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}") from None
