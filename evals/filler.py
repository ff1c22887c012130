"""Haystack text and answer values, made from a seed (nothing is downloaded).

Two fillers, both free of digits so that a number in a prompt can only be a needle:

* ``repeated``: one short passage said over and over (RULER's "noise" haystack);
* ``varied``: prose assembled from word lists, every sentence drawn anew, so no two stretches of
  the context look alike (RULER's essay haystack, without the essays).

Values a needle can carry: 7-digit numbers, two-word compounds (``amber-falcon``) and UUID-like
hex strings; keys are compounds too. The compounds use words that the filler never says. Made-up
words (``vorlek``) come from syllables; the word tasks use them so the model cannot lean on
what it knows about real words.
"""

from __future__ import annotations

import random
from typing import Iterator

REPEATED = ("The tide comes in and the tide goes out. The lamps are lit at dusk and put out at dawn. "
            "A cart rolls down the lane and back up again. Nothing else happens here.")

_SUBJECTS = ("the old ferryman", "a tired clerk", "the baker's daughter", "a travelling tinker", "the harbour master",
             "a young shepherd", "the village priest", "an elderly weaver", "the night watchman", "a wandering poet",
             "the blacksmith", "a quiet stranger", "the innkeeper", "a pair of pilgrims", "the schoolteacher",
             "a ragged fiddler", "the gardener", "a merchant from the coast", "the miller's apprentice",
             "a retired sailor")
_VERBS = ("mended", "carried", "painted", "counted", "polished", "sold", "buried", "found", "wrapped", "sharpened",
          "traded", "repaired", "described", "forgot", "borrowed", "returned", "weighed", "inspected", "copied",
          "admired")
_OBJECTS = ("a torn fishing net", "a basket of pears", "the chapel door", "a bundle of letters", "an iron kettle",
            "a bolt of blue cloth", "the broken cartwheel", "a wooden chest", "a map of the valley",
            "a jar of honey", "a lantern with a cracked pane", "the church bell rope", "a stack of slate tiles",
            "a sack of barley", "a pair of muddy boots", "the mayor's portrait", "a clay pitcher",
            "a crate of candles", "a folded sail", "an old compass")
_PLACES = ("beside the harbour", "behind the granary", "at the edge of the marsh", "under the stone bridge",
           "in the market square", "near the abbey ruins", "on the hill road", "by the frozen pond",
           "inside the drafty barn", "at the crossroads", "along the river path", "in the cellar of the inn",
           "beneath the elm trees", "outside the town gate", "on the windy pier")
_CLAUSES = ("while the rain kept falling", "before the bells rang for supper", "as the fog rolled in",
            "though nobody had asked", "without saying a word", "while the dogs slept by the fire",
            "long after the lamps were lit", "as the geese flew south", "when the market had emptied",
            "because the winter was coming", "while the children watched", "just as the wind turned")
_SHORT = ("Nobody remembered why.", "It had always been that way.", "The day went on.", "Few people noticed.",
          "The evening was cold and clear.", "Somewhere a door slammed.", "The season turned slowly.")

# Words for keys and values; none of them appears in the filler above.
_ADJECTIVES = ("amber", "brisk", "cobalt", "dusky", "ember", "frosty", "gilded", "hollow", "ivory", "jagged",
               "lunar", "mossy", "noble", "opal", "placid", "rustic", "scarlet", "tawny", "velvet", "wintry",
               "zesty", "crimson", "silver", "verdant", "somber", "radiant", "fabled", "humble")
_NOUNS = ("falcon", "lantern", "orchard", "glacier", "thimble", "compass", "meadow", "anvil", "harp", "quarry",
          "beacon", "saddle", "walrus", "prism", "tundra", "canyon", "heron", "goblet", "spindle", "citadel",
          "marble", "otter", "lagoon", "parsnip", "trellis", "dynamo", "juniper", "pelican")
_SYLLABLES = ("ba", "ko", "ri", "mu", "ten", "vor", "la", "shi", "dro", "pel", "ka", "zun", "mi", "tra", "gol",
              "ne", "fi", "sar", "qu", "lo", "bex", "an", "tu", "rem", "ov", "ix", "dal", "ye", "po", "wen")


def repeated_sentences(rng: random.Random) -> Iterator[str]:
    """The same passage forever (``rng`` unused: the repetition is the point)."""
    del rng
    while True:
        yield REPEATED


def varied_sentences(rng: random.Random) -> Iterator[str]:
    """An endless stream of fresh sentences from the word lists."""
    while True:
        r = rng.random()
        if r < 0.1:
            yield rng.choice(_SHORT)
            continue
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}"
        if r < 0.55:
            s += f" {rng.choice(_CLAUSES)}"
        yield s[0].upper() + s[1:] + "."


FILLERS = {"repeated": repeated_sentences, "varied": varied_sentences}


def number(rng: random.Random, taken: set[str]) -> str:
    """A 7-digit number not in ``taken`` (added to it)."""
    return _fresh(lambda: str(rng.randrange(1_000_000, 10_000_000)), taken)


def compound(rng: random.Random, taken: set[str]) -> str:
    """``adjective-noun``, not in ``taken`` (added to it)."""
    return _fresh(lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}", taken)


def uuid_like(rng: random.Random, taken: set[str]) -> str:
    """Lower-case hex in the 8-4-4-4-12 shape of a UUID (not a valid RFC 4122 one: no version bits)."""
    def one() -> str:
        digits = "".join(rng.choice("0123456789abcdef") for _ in range(32))
        return "-".join((digits[:8], digits[8:12], digits[12:16], digits[16:20], digits[20:]))
    return _fresh(one, taken)


def made_up_word(rng: random.Random, taken: set[str]) -> str:
    """A pronounceable non-word of 2-3 syllables, not in ``taken`` (added to it)."""
    return _fresh(lambda: "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))), taken)


VALUES = {"number": number, "word": compound, "uuid": uuid_like}


def _fresh(draw, taken: set[str]) -> str:
    for _ in range(10_000):
        value = draw()
        if value not in taken:
            taken.add(value)
            return value
    raise RuntimeError("ran out of distinct values")  # the pools hold hundreds of thousands


def words_of(sentences: Iterator[str], n_words: int) -> list[list[str]]:
    """The first ``n_words`` words of a sentence stream, kept grouped by sentence (the last one
    may be cut short)."""
    out: list[list[str]] = []
    left = n_words
    while left > 0:
        words = next(sentences).split()
        out.append(words[:left])
        left -= len(out[-1])
    return out
