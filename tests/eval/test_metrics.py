"""Spelling metrics against hand-computed examples."""

import math

import pytest

from textdiff.eval.metrics import aggregate, cer, normalize_text, score, shows_text, word_accuracy


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


def test_aggregate_leaves_rates_without_images_as_nan():
    m = aggregate([score("abc", "abc", True)])
    assert math.isnan(m["false_text_rate"])
    assert m["cer"] == 0.0


def test_drop_spaces_scores_a_reading_split_into_words_as_one_string():
    assert score("12 3", "123", normalize=True).char_errors == 1
    dropped = score("12 3", "123", normalize=True, drop_spaces=True)
    assert (dropped.char_errors, dropped.exact) == (0, True)
    assert normalize_text(" 4 7\n1 ", normalize=False, drop_spaces=True) == "471"
