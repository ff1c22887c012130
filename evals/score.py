"""Scoring a reply: which expected values it states, and which distractors it states instead.

    score = hits / (len(expected) + false_hits)

``hits``: expected values found in the reply; ``false_hits``: the draft's distractors found in it
(another key's value, the other variable chain, a rare word). A reply that names only the answer
scores 1; one that also names a distractor scores 1/2; naming every value in the prompt does not
pay. A value is found only as a whole item: a number not inside a longer run of digits, a UUID not
inside longer hex, words not inside longer words (case-insensitive; the hyphen of a compound may
be a space).
"""

from __future__ import annotations

import re


def _pattern(value: str, kind: str) -> re.Pattern:
    if kind == "number":
        return re.compile(rf"(?<!\d){re.escape(value)}(?!\d)")
    if kind == "uuid":
        return re.compile(rf"(?<![0-9a-f]){re.escape(value)}(?![0-9a-f])", re.IGNORECASE)
    body = r"[-\s]+".join(re.escape(part) for part in re.split(r"[-\s]+", value))
    return re.compile(rf"(?<![\w-]){body}(?![\w-])", re.IGNORECASE)


def found(value: str, reply: str, kind: str) -> bool:
    return _pattern(value, kind).search(reply) is not None


def score(reply: str, expected: tuple[str, ...] | list[str], distractors: tuple[str, ...] | list[str] = (),
          kind: str = "text") -> float:
    hits = sum(found(v, reply, kind) for v in expected)
    false_hits = sum(found(v, reply, kind) for v in distractors)
    return hits / (len(expected) + false_hits)
