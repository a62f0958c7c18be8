"""Spelling metrics: how far an OCR reading is from the transcription an image was asked to show.

For a text-bearing prompt (target not empty): character error rate (Levenshtein distance / target length;
above 1 when the reading has many extra characters), exact match, and word accuracy (the share of target
words found, in order, in the reading). For a text-free prompt (target empty): whether the image wrongly
shows text, i.e. OCR read a word of at least 2 letters or digits with confidence at least 50 (Tesseract
reads shapes and specks as single characters such as ``O``, ``|`` or ``_``: measured on text-free synthetic
renders, docs/eval.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from rapidfuzz.distance import Levenshtein

_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str, normalize: bool, drop_spaces: bool = False) -> str:
    """The text compared by the metrics: with ``normalize``, case-folded with whitespace runs made one space;
    with ``drop_spaces``, every whitespace character removed.

    Leading and trailing whitespace is always removed (Tesseract ends its readings with a newline).
    """
    text = text.strip()
    if normalize:
        text = _WHITESPACE.sub(" ", text.casefold())
    if drop_spaces:
        text = _WHITESPACE.sub("", text)
    return text


def char_errors(pred: str, target: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions) between the reading and the target."""
    return Levenshtein.distance(pred, target)


def cer(pred: str, target: str) -> float:
    """Character error rate: edit distance / target length (target must not be empty)."""
    if not target:
        raise ValueError("cer needs a non-empty target; text-free prompts are scored by shows_text")
    return char_errors(pred, target) / len(target)


def words_matched(pred: str, target: str) -> int:
    """How many target words appear in the reading in an optimal word-level alignment (whole words only)."""
    target_words, pred_words = target.split(), pred.split()
    return sum(block.size for block in Levenshtein.editops(pred_words, target_words).as_matching_blocks())


def word_accuracy(pred: str, target: str) -> float:
    """Share of target words read exactly: :func:`words_matched` / number of target words."""
    n = len(target.split())
    if n == 0:
        raise ValueError("word_accuracy needs a target with at least one word")
    return words_matched(pred, target) / n


def shows_text(words: Sequence[tuple[str, float]], min_chars: int = 2, min_conf: float = 50.0) -> bool:
    """True when some word (text, confidence 0..100) has ``min_chars`` letters or digits and confidence
    at least ``min_conf``: the image shows text."""
    return any(sum(ch.isalnum() for ch in w) >= min_chars and conf >= min_conf for w, conf in words)


@dataclass(frozen=True)
class Score:
    """The metrics of one image: ``target`` and ``pred`` after normalisation; text-free when target is ""."""

    target: str
    pred: str
    char_errors: int
    target_chars: int
    words_matched: int
    target_words: int
    exact: bool
    false_text: bool

    @property
    def cer(self) -> float:
        """Character error rate of this image (0 for a text-free target)."""
        return self.char_errors / self.target_chars if self.target_chars else 0.0


def score(pred: str, target: str, normalize: bool, text_seen: Optional[bool] = None,
          drop_spaces: bool = False) -> Score:
    """Score one OCR reading against its target transcription.

    ``text_seen`` says whether the image shows text (see :func:`shows_text`); it counts only for a
    text-free target, and when None it is judged from ``pred`` alone with every word taken as confident.
    """
    if not target.strip() and text_seen is None:  # judged on the words, before spaces are dropped
        text_seen = shows_text([(w, 100.0) for w in normalize_text(pred, normalize).split()])
    pred, target = normalize_text(pred, normalize, drop_spaces), normalize_text(target, normalize, drop_spaces)
    if not target:
        return Score(target, pred, 0, 0, 0, 0, exact=not text_seen, false_text=text_seen)
    return Score(target, pred, char_errors(pred, target), len(target), words_matched(pred, target),
                 len(target.split()), exact=pred == target, false_text=False)


def aggregate(scores: Sequence[Score]) -> dict[str, float]:
    """Pool scores into one set of metrics.

    ``cer`` is the total edit distance over the total target length of the text-bearing images (so long
    targets weigh by their length), ``exact_match`` the share of text-bearing images read exactly,
    ``word_accuracy`` the matched target words over all target words, ``false_text_rate`` the share of
    text-free images read as holding text. A rate with no images to measure is NaN; ``n``, ``n_text`` and
    ``n_empty`` count the images.
    """
    text = [s for s in scores if s.target_chars]
    empty = [s for s in scores if not s.target_chars]
    nan = float("nan")
    chars = sum(s.target_chars for s in text)
    words = sum(s.target_words for s in text)
    return {
        "cer": sum(s.char_errors for s in text) / chars if chars else nan,
        "exact_match": sum(s.exact for s in text) / len(text) if text else nan,
        "word_accuracy": sum(s.words_matched for s in text) / words if words else nan,
        "false_text_rate": sum(s.false_text for s in empty) / len(empty) if empty else nan,
        "n": len(scores),
        "n_text": len(text),
        "n_empty": len(empty),
    }
