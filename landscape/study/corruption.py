"""Seeded corruptions of input text, to measure whether flatter solutions are more robust to messy input.

Four kinds, each at a ``light`` and a ``heavy`` level (the probability that a word is touched):

* ``typos`` — keyboard slips inside a word: swap two neighbouring letters, drop one, double one,
  or replace one by a key next to it on a QWERTY keyboard;
* ``spacing`` — a space dropped between two words or doubled, punctuation dropped or added;
* ``confusables`` — Latin letters replaced by look-alike Unicode letters (Cyrillic а е о р с х …,
  the classic homoglyph attack; the tokenizer sees other tokens, a reader sees the same text);
* ``emoji`` — emoji inserted after words.

Every corruption is a pure function of (text, level, seed, index): the same test set gets the same
corruptions for every model, so accuracy drops are paired across methods.
"""
from __future__ import annotations

import hashlib
import random
from typing import Callable, Sequence

__all__ = ["CORRUPTIONS", "LEVELS", "corrupt", "corrupt_all"]

LEVELS = {"light": 0.1, "heavy": 0.35}

_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS = {}
for _r, _row in enumerate(_KEYBOARD):
    for _c, _ch in enumerate(_row):
        near = [_row[j] for j in (_c - 1, _c + 1) if 0 <= j < len(_row)]
        near += [_KEYBOARD[rr][_c] for rr in (_r - 1, _r + 1) if 0 <= rr < 3 and _c < len(_KEYBOARD[rr])]
        _NEIGHBOURS[_ch] = near
_CONFUSABLE = {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "y": "у", "i": "і", "s": "ѕ", "j": "ј"}
_EMOJI = ["😂", "🔥", "👍", "😍", "🙄", "💯", "😭", "🎬", "🍿", "✨"]
_PUNCT = [",", ".", "!", "?", ";", "..."]


def _typo(word: str, rng: random.Random) -> str:
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    if not letters:
        return word
    i = rng.choice(letters)
    kind = rng.randrange(4)
    if kind == 0 and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1 and len(word) > 1:
        return word[:i] + word[i + 1 :]
    if kind == 2:
        return word[: i + 1] + word[i] + word[i + 1 :]
    near = _NEIGHBOURS.get(word[i].lower())
    return word[:i] + (rng.choice(near) if near else word[i]) + word[i + 1 :]


def _confusable(word: str, rng: random.Random) -> str:
    spots = [i for i, ch in enumerate(word) if ch in _CONFUSABLE]
    if not spots:
        return word
    i = rng.choice(spots)
    return word[:i] + _CONFUSABLE[word[i]] + word[i + 1 :]


def _word_level(edit: Callable[[str, random.Random], str]) -> Callable[[str, float, random.Random], str]:
    def apply(text: str, p: float, rng: random.Random) -> str:
        return " ".join(edit(w, rng) if rng.random() < p else w for w in text.split(" "))

    return apply


def _spacing(text: str, p: float, rng: random.Random) -> str:
    out = []
    for w in text.split(" "):
        if rng.random() < p:
            kind = rng.randrange(4)
            if kind == 0 and out:  # glue to the previous word
                out[-1] += w
                continue
            if kind == 1:
                w = w + " "  # a doubled space once joined
            elif kind == 2:
                w = w.rstrip(".,!?;:") or w
            else:
                w = w + rng.choice(_PUNCT)
        out.append(w)
    return " ".join(out)


def _emoji(text: str, p: float, rng: random.Random) -> str:
    return " ".join(w + " " + rng.choice(_EMOJI) if rng.random() < p else w for w in text.split(" "))


CORRUPTIONS: dict[str, Callable[[str, float, random.Random], str]] = {
    "typos": _word_level(_typo),
    "spacing": _spacing,
    "confusables": _word_level(_confusable),
    "emoji": _emoji,
}


def _rng(kind: str, level: str, seed: int, index: int) -> random.Random:
    digest = hashlib.blake2b(f"{kind}/{level}/{seed}/{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def corrupt(text: str, kind: str, level: str = "light", *, seed: int = 0, index: int = 0) -> str:
    """One corrupted copy of ``text``; deterministic in (text, kind, level, seed, index)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {sorted(CORRUPTIONS)}")
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {sorted(LEVELS)}")
    return CORRUPTIONS[kind](text, LEVELS[level], _rng(kind, level, seed, index))


def corrupt_all(texts: Sequence[str], kind: str, level: str = "light", *, seed: int = 0) -> list[str]:
    """Corrupt every text (text i uses index i), the same way for every model."""
    return [corrupt(t, kind, level, seed=seed, index=i) for i, t in enumerate(texts)]
