"""Word error rate: the word-level Levenshtein distance between a reference and a hypothesis, per reference word."""

from __future__ import annotations

import re

_NOT_WORD = re.compile(r"[^a-z0-9' ]+")


def normalize(text: str) -> list[str]:
    """``text`` as lowercase words: punctuation (anything but letters, digits and apostrophes) becomes a space.

    Dashes split words (``"way--in"`` is two words), as a reader pronounces them.
    """
    return _NOT_WORD.sub(" ", text.lower()).split()


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Fewest word substitutions, deletions and insertions turning ``ref`` into ``hyp``.

    One row of the dynamic programme at a time: O(len(ref) · len(hyp)) time, O(len(hyp)) memory.
    """
    previous = list(range(len(hyp) + 1))  # distance from ref[:0] to hyp[:j]
    for i, word in enumerate(ref, start=1):
        current = [i]
        for j, other in enumerate(hyp, start=1):
            current.append(
                min(
                    previous[j] + 1,  # ref word deleted
                    current[j - 1] + 1,  # hyp word inserted
                    previous[j - 1] + (word != other),  # match or substitution
                )
            )
        previous = current
    return previous[-1]


def wer(ref: str, hyp: str) -> float:
    """Word error rate of ``hyp`` against ``ref``, both normalised (lowercase, no punctuation).

    ``edit_distance / len(ref words)``; can exceed 1 when the hypothesis inserts many words.
    """
    ref_words, hyp_words = normalize(ref), normalize(hyp)
    if not ref_words:
        raise ValueError(f"the reference has no words ({ref!r}): the word error rate is undefined")
    return edit_distance(ref_words, hyp_words) / len(ref_words)
