"""Spelling metrics against hand-computed examples, the field's (AnyText's NED and sentence accuracy,
MARIO-Eval's word accuracy) on the worked examples of docs/eval.md."""

import math

import pytest

from textdiff.eval.metrics import (aggregate, cer, mario_match, mario_words, ned, normalize_text, paired_lines, score,
                                   shows_text, text_lines, word_accuracy)


def test_cer_counts_one_substitution_over_target_length():
    # "hallo" -> "hello": one substitution, 5 target characters
    assert cer("hallo", "hello") == pytest.approx(1 / 5)


def test_cer_counts_insertions_and_deletions():
    # "helo" misses one l (1 deletion); "helloo" has one extra o (1 insertion)
    assert cer("helo", "hello") == pytest.approx(0.2)
    assert cer("helloo", "hello") == pytest.approx(0.2)


def test_cer_of_empty_reading_is_one():
    assert cer("", "lantern") == 1.0


def test_cer_can_exceed_one_when_reading_is_longer_than_target():
    # "ab" -> "xyzwv": 2 substitutions + 3 insertions = 5 edits over 2 characters
    assert cer("xyzwv", "ab") == pytest.approx(2.5)


def test_cer_rejects_an_empty_target():
    with pytest.raises(ValueError, match="shows_text"):
        cer("x", "")


def test_word_accuracy_counts_whole_words_in_order():
    assert word_accuracy("the quick brwn fox", "the quick brown fox") == pytest.approx(3 / 4)
    assert word_accuracy("fox the", "the fox") == pytest.approx(1 / 2)
    assert word_accuracy("", "two words") == 0.0


def test_normalisation_folds_case_and_collapses_whitespace():
    assert normalize_text("  Hello \n  World\n", normalize=True) == "hello world"
    assert normalize_text("  Hello \n  World\n", normalize=False) == "Hello \n  World"


def test_score_with_normalisation_on_accepts_case_and_spacing_differences():
    s = score("HELLO   world\n", "Hello World", normalize=True)
    assert (s.exact, s.char_errors, s.words_matched, s.target_words) == (True, 0, 2, 2)


def test_score_with_normalisation_off_counts_case_and_spacing_as_errors():
    s = score("HELLO   world\n", "Hello World", normalize=False)
    # H,E,L,L,O vs H,e,l,l,o: 4 substitutions; 2 extra spaces; w vs W: 1 substitution -> 7 edits
    assert (s.exact, s.char_errors, s.words_matched) == (False, 7, 0)
    assert s.cer == pytest.approx(7 / 11)


def test_false_text_needs_a_confident_word_of_two_letters_or_digits():
    assert not shows_text([("_", 90.0), ("|", 90.0), ("O", 95.0)])  # specks and shapes read as one character
    assert not shows_text([("oO", 40.0)])  # long enough, but not confident
    assert shows_text([("oO", 70.0)])
    assert shows_text([("a7", 50.0)])
    assert shows_text([("O", 95.0)], min_chars=1)


def test_score_of_a_text_free_target_takes_text_seen_or_judges_the_reading():
    assert score("zz", "", normalize=True, text_seen=False).false_text is False
    assert score("", "", normalize=True, text_seen=True).false_text is True
    assert score("_ x", "", normalize=True).false_text is False
    assert score("wx", "", normalize=True).false_text is True


def test_aggregate_pools_characters_words_and_images():
    scores = [score("hallo", "hello", True),          # 1 edit / 5 chars, 0/1 words, not exact
              score("big cat", "big cat", True),      # 0 / 7, 2/2 words, exact
              score("", "", True),                    # text-free, read as empty
              score("zz", "", True)]                  # text-free, read as text
    m = aggregate(scores)
    assert m["cer"] == pytest.approx(1 / 12)
    assert m["exact_match"] == pytest.approx(1 / 2)
    assert m["word_accuracy"] == pytest.approx(2 / 3)
    assert m["false_text_rate"] == pytest.approx(1 / 2)
    assert (m["n"], m["n_text"], m["n_empty"]) == (4, 2, 2)
    # lines: "hallo" for "hello" (NED 0.8, wrong), "big cat" (NED 1, right); MARIO: 0 of 1 and 2 of 2 words
    assert (m["ned"], m["sentence_accuracy"]) == (pytest.approx(0.9), 0.5)
    assert (m["mario_word_accuracy"], m["mario_precision"], m["mario_recall"], m["mario_f_measure"]) == (0.5, 0.5, 0.5,
                                                                                                       0.5)


def test_aggregate_leaves_rates_without_images_as_nan():
    m = aggregate([score("abc", "abc", True)])
    assert math.isnan(m["false_text_rate"])
    assert (m["cer"], m["ned"], m["sentence_accuracy"], m["mario_f_measure"]) == (0.0, 1.0, 1.0, 1.0)
    free = aggregate([score("", "", True)])
    rates = ("cer", "ned", "sentence_accuracy", "mario_word_accuracy", "mario_f_measure")
    assert all(math.isnan(free[k]) for k in rates)


def test_drop_spaces_scores_a_reading_split_into_words_as_one_string():
    assert score("12 3", "123", normalize=True).char_errors == 1
    dropped = score("12 3", "123", normalize=True, drop_spaces=True)
    assert (dropped.char_errors, dropped.exact) == (0, True)
    assert normalize_text(" 4 7\n1 ", normalize=False, drop_spaces=True) == "471"


# --- NED and sentence accuracy (AnyText) ------------------------------------------------------------------


def test_ned_is_one_minus_edits_over_the_longer_string():
    assert ned("hallo", "hello") == pytest.approx(1 - 1 / 5)
    assert ned("ab", "abcd") == pytest.approx(1 - 2 / 4)  # the reading is the shorter: still over 4
    assert ned("abcd", "ab") == pytest.approx(1 - 2 / 4)
    assert ned("xyz", "abc") == 0.0 and ned("", "abc") == 0.0
    assert ned("", "") == 1.0  # two empty strings are the same string


def test_lines_are_split_at_breaks_and_normalised_each():
    assert text_lines("  Big  CAT \n\n sat\n", normalize=True) == ["big cat", "sat"]
    assert text_lines("1 2\n3", normalize=False, drop_spaces=True) == ["12", "3"]


def test_reading_lines_pair_with_target_lines_in_order():
    assert paired_lines(["a", "b"], ["x", "y"]) == ["a", "b"]
    assert paired_lines(["a", "b", "c"], ["x", "y"]) == ["a", "b c"]  # extra lines join the last
    assert paired_lines(["a"], ["x", "y", "z"]) == ["a", "", ""]  # missing lines read as ""
    assert paired_lines(["12", "3"], ["x"], drop_spaces=True) == ["123"]
    assert paired_lines(["a"], []) == []


def test_sentence_accuracy_and_ned_score_each_target_line():
    """docs/eval.md's worked example: "big cat / sat" read as "Big cat / sad"."""
    s = score("Big cat\nsad", "big cat\nsat", normalize=True)
    assert (s.target_lines, s.lines_exact) == (2, 1)
    assert s.ned_sum == pytest.approx(1 + (1 - 1 / 3))
    m = aggregate([s, score("dog", "dog", normalize=True)])
    assert m["sentence_accuracy"] == pytest.approx(2 / 3)  # 2 of 3 lines
    assert m["ned"] == pytest.approx((1 + 2 / 3 + 1) / 3)  # mean over lines, not images
    assert m["exact_match"] == 0.5  # 1 of 2 images


def test_a_one_line_target_is_compared_with_the_whole_reading():
    s = score("big\ncat", "big cat", normalize=True)
    assert (s.lines_exact, s.ned_sum, s.exact) == (1, 1.0, True)
    extra = score("big cat\nxx", "big cat", normalize=True)  # extra text counts against the line
    assert extra.lines_exact == 0 and extra.ned_sum == pytest.approx(1 - 3 / 10)


def test_line_metrics_follow_the_normalisation_setting():
    s = score("Hello", "hello", normalize=False)
    assert (s.lines_exact, s.ned_sum) == (0, pytest.approx(0.8))


# --- word accuracy, precision, recall, F (MARIO-Eval) -----------------------------------------------------


def test_mario_words_are_lower_cased_whitespace_split():
    assert mario_words(" Hello\nWORLD  hello ") == ["hello", "world", "hello"]
    assert mario_words("12 3", drop_spaces=True) == ["123"]


def test_mario_matches_words_as_multisets_in_any_order():
    assert mario_match(["world", "hello"], ["hello", "world"]) == (2, True)
    assert mario_match(["hello", "world", "foo"], ["hello", "world", "hello"]) == (2, False)
    assert mario_match([], ["cat"]) == (0, False)
    # its accuracy concatenates the sorted words, so "ab c" equals "a bc" with no word shared, as its script does
    assert mario_match(["ab", "c"], ["a", "bc"]) == (0, True)


def test_mario_is_case_insensitive_whatever_the_normalisation():
    s = score("HELLO", "hello", normalize=False)
    assert (s.exact, s.mario_exact, s.mario_precision, s.mario_recall) == (False, True, 1.0, 1.0)


def test_mario_precision_recall_and_f_pool_as_textdiffuser_does():
    """docs/eval.md's worked example: per-image precision and recall are averaged, F is their harmonic mean."""
    first = score("hello world foo", "Hello World hello", normalize=True)  # 2 shared of 3 read, of 3 asked
    second = score("cat", "big cat", normalize=True)  # 1 shared of 1 read, of 2 asked
    assert (first.mario_precision, first.mario_recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert (second.mario_precision, second.mario_recall) == (1.0, 0.5)
    m = aggregate([first, second, score("", "", normalize=True)])  # the text-free image does not count
    precision, recall = (2 / 3 + 1) / 2, (2 / 3 + 1 / 2) / 2
    assert (m["mario_precision"], m["mario_recall"]) == (pytest.approx(5 / 6), pytest.approx(7 / 12))
    assert m["mario_f_measure"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert m["mario_f_measure"] == pytest.approx(35 / 51)
    assert m["mario_word_accuracy"] == 0.0


def test_an_empty_reading_has_mario_precision_zero():
    s = score("", "cat", normalize=True)
    assert (s.mario_precision, s.mario_recall, s.mario_exact) == (0.0, 0.0, False)
    assert aggregate([s])["mario_f_measure"] == 0.0
