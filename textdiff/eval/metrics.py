"""Spelling metrics: how far an OCR reading is from the transcription an image was asked to show.

For a text-bearing prompt (target not empty): character error rate (Levenshtein distance / target length;
above 1 when the reading has many extra characters), exact match, and word accuracy (the share of target
words found, in order, in the reading). Beside them, the field's figures, so textdiff's can be set next to
published ones: NED and sentence accuracy per line (AnyText), and MARIO-Eval's word accuracy, precision,
recall and F-measure (TextDiffuser); docs/eval.md gives each one's source and a worked example. For a
text-free prompt (target empty): whether the image wrongly shows text, i.e. OCR read a word of at least 2
letters or digits with confidence at least 50 (Tesseract reads shapes and specks as single characters such as
``O``, ``|`` or ``_``: measured on text-free synthetic renders, docs/eval.md).
"""

from __future__ import annotations

import re
from collections import Counter
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


def ned(pred: str, target: str) -> float:
    """Normalised edit distance as AnyText scores a line: 1 - Levenshtein distance / length of the longer
    string, so 1 is identical and 0 shares nothing; 1 for two empty strings."""
    longer = max(len(pred), len(target))
    return 1.0 - char_errors(pred, target) / longer if longer else 1.0


def text_lines(text: str, normalize: bool, drop_spaces: bool = False) -> list[str]:
    """The lines of ``text`` as the line metrics compare them: split at line breaks, each normalised
    (:func:`normalize_text`), empty ones left out."""
    lines = (normalize_text(line, normalize, drop_spaces) for line in text.splitlines())
    return [line for line in lines if line]


def paired_lines(pred_lines: Sequence[str], target_lines: Sequence[str], drop_spaces: bool = False) -> list[str]:
    """The reading's line for each target line, in order: line k for target line k, "" where the reading has
    fewer lines, and its extra lines joined by spaces (none with ``drop_spaces``) onto the one paired with
    the last target line (so a one-line target is compared with the whole reading, and extra text counts
    against it)."""
    n = len(target_lines)
    if n == 0:
        return []
    paired = list(pred_lines[:n - 1]) + [("" if drop_spaces else " ").join(pred_lines[n - 1:])]
    return paired + [""] * (n - len(paired))


def mario_words(text: str, drop_spaces: bool = False) -> list[str]:
    """The words MARIO-Eval compares: ``text`` split at whitespace, lower-cased (with ``drop_spaces``, the
    whole text without whitespace is one word)."""
    text = text.lower()
    if drop_spaces:
        text = _WHITESPACE.sub("", text)
    return text.split()


def mario_match(pred_words: Sequence[str], target_words: Sequence[str]) -> tuple[int, bool]:
    """(matched, exact) as TextDiffuser's MARIO-Eval scores one image: ``matched`` counts the words shared by
    the two multisets (each predicted word removes one equal target word); ``exact`` is its accuracy rule,
    the words of each sorted and concatenated compare equal."""
    matched = sum((Counter(pred_words) & Counter(target_words)).values())
    return matched, "".join(sorted(pred_words)) == "".join(sorted(target_words))


def shows_text(words: Sequence[tuple[str, float]], min_chars: int = 2, min_conf: float = 50.0) -> bool:
    """True when some word (text, confidence 0..100) has ``min_chars`` letters or digits and confidence
    at least ``min_conf``: the image shows text."""
    return any(sum(ch.isalnum() for ch in w) >= min_chars and conf >= min_conf for w, conf in words)


@dataclass(frozen=True)
class Score:
    """The metrics of one image: ``target`` and ``pred`` after normalisation; text-free when target is "".

    Per line (``target_lines`` of them): ``lines_exact`` read exactly and ``ned_sum`` the sum of their NEDs.
    MARIO-Eval: ``mario_pred_words`` and ``mario_target_words`` words, ``mario_matched`` of them shared,
    ``mario_exact`` its accuracy rule.
    """

    target: str
    pred: str
    char_errors: int
    target_chars: int
    words_matched: int
    target_words: int
    exact: bool
    false_text: bool
    target_lines: int = 0
    lines_exact: int = 0
    ned_sum: float = 0.0
    mario_pred_words: int = 0
    mario_target_words: int = 0
    mario_matched: int = 0
    mario_exact: bool = False

    @property
    def cer(self) -> float:
        """Character error rate of this image (0 for a text-free target)."""
        return self.char_errors / self.target_chars if self.target_chars else 0.0

    @property
    def mario_precision(self) -> float:
        """Shared words over the words read (0 when nothing was read, as MARIO-Eval's script gives)."""
        return self.mario_matched / self.mario_pred_words if self.mario_pred_words else 0.0

    @property
    def mario_recall(self) -> float:
        """Shared words over the target's words."""
        return self.mario_matched / self.mario_target_words if self.mario_target_words else 0.0


def score(pred: str, target: str, normalize: bool, text_seen: Optional[bool] = None,
          drop_spaces: bool = False) -> Score:
    """Score one OCR reading against its target transcription.

    ``text_seen`` says whether the image shows text (see :func:`shows_text`); it counts only for a
    text-free target, and when None it is judged from ``pred`` alone with every word taken as confident.
    Lines are paired by :func:`paired_lines` after the same normalisation; MARIO-Eval's words are always
    compared lower-cased (:func:`mario_words`), as its definition is.
    """
    if not target.strip() and text_seen is None:  # judged on the words, before spaces are dropped
        text_seen = shows_text([(w, 100.0) for w in normalize_text(pred, normalize).split()])
    raw_pred, raw_target = pred, target
    pred, target = normalize_text(pred, normalize, drop_spaces), normalize_text(target, normalize, drop_spaces)
    if not target:
        return Score(target, pred, 0, 0, 0, 0, exact=not text_seen, false_text=text_seen)
    target_lines = text_lines(raw_target, normalize, drop_spaces)
    pred_lines = paired_lines(text_lines(raw_pred, normalize, drop_spaces), target_lines, drop_spaces)
    pred_words, target_words = mario_words(raw_pred, drop_spaces), mario_words(raw_target, drop_spaces)
    matched, mario_exact = mario_match(pred_words, target_words)
    return Score(target, pred, char_errors(pred, target), len(target), words_matched(pred, target),
                 len(target.split()), exact=pred == target, false_text=False,
                 target_lines=len(target_lines), lines_exact=sum(p == t for p, t in zip(pred_lines, target_lines)),
                 ned_sum=sum(ned(p, t) for p, t in zip(pred_lines, target_lines)),
                 mario_pred_words=len(pred_words), mario_target_words=len(target_words), mario_matched=matched,
                 mario_exact=mario_exact)


def _harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else (0.0 if a + b == 0 else float("nan"))


def aggregate(scores: Sequence[Score]) -> dict[str, float]:
    """Pool scores into one set of metrics.

    ``cer`` is the total edit distance over the total target length of the text-bearing images (so long
    targets weigh by their length), ``exact_match`` the share of text-bearing images read exactly,
    ``word_accuracy`` the matched target words over all target words, ``false_text_rate`` the share of
    text-free images read as holding text. As their sources pool them: ``ned`` the mean NED and
    ``sentence_accuracy`` the share read exactly of all target lines (AnyText); ``mario_word_accuracy``,
    ``mario_precision`` and ``mario_recall`` the means over text-bearing images and ``mario_f_measure`` the
    harmonic mean of the last two means (TextDiffuser's MARIO-Eval). A rate with no images to measure is NaN;
    ``n``, ``n_text`` and ``n_empty`` count the images.
    """
    text = [s for s in scores if s.target_chars]
    empty = [s for s in scores if not s.target_chars]
    nan = float("nan")
    chars = sum(s.target_chars for s in text)
    words = sum(s.target_words for s in text)
    lines = sum(s.target_lines for s in text)
    precision = sum(s.mario_precision for s in text) / len(text) if text else nan
    recall = sum(s.mario_recall for s in text) / len(text) if text else nan
    return {
        "cer": sum(s.char_errors for s in text) / chars if chars else nan,
        "exact_match": sum(s.exact for s in text) / len(text) if text else nan,
        "word_accuracy": sum(s.words_matched for s in text) / words if words else nan,
        "false_text_rate": sum(s.false_text for s in empty) / len(empty) if empty else nan,
        "ned": sum(s.ned_sum for s in text) / lines if lines else nan,
        "sentence_accuracy": sum(s.lines_exact for s in text) / lines if lines else nan,
        "mario_word_accuracy": sum(s.mario_exact for s in text) / len(text) if text else nan,
        "mario_precision": precision,
        "mario_recall": recall,
        "mario_f_measure": _harmonic_mean(precision, recall),
        "n": len(scores),
        "n_text": len(text),
        "n_empty": len(empty),
    }
