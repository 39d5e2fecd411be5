"""Metric tests: cases follow the official VQA evaluation's normalisation rules and ChartQA's relaxed accuracy."""
import pytest

from components.evaluate.metrics import (
    METRICS,
    aggregate,
    anls,
    exact_match,
    normalize_vqa_answer,
    preference_reward_stats,
    relaxed_accuracy,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, normalised",
    [
        # punctuation: a mark touching a space is deleted, one inside a word becomes a space
        ("yes!", "yes"),
        ("yes !", "yes"),
        ("black/white", "black white"),
        ("hot-dog", "hot dog"),
        ("(left)", "left"),
        ('"stop"', "stop"),
        # a digit-comma-digit anywhere switches every mark to deletion
        ("1,000", "1000"),
        ("1,000 people, yes", "1000 people yes"),
        # periodStrip: periods not followed by a digit go, decimal points stay
        ("end.", "end"),
        ("3.5", "3.5"),
        ("3.", "3"),
        # articles removed, case folded, whitespace collapsed
        ("The Dog", "dog"),
        ("a cat on an  island", "cat on island"),
        ("  tabs\tand\nnewlines ", "tabs and newlines"),
        # manualMap: number words zero..ten (and none) become digits; others stay words
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("two dogs", "2 dogs"),
        # contractions map adds the apostrophe
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("thats right", "that's right"),
        ("youre", "you're"),
        # the apostrophe itself is not punctuation in the official list
        ("cat's", "cat's"),
        # official quirk kept: capitalised keys ("Im") never match after lowercasing
        ("Im", "im"),
    ],
)
def test_vqa_normalisation_follows_official_rules(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_official_leave_one_out_form_on_ten_answers(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides_and_single_reference_is_exact_match():
    assert vqa_accuracy("The Dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("Yes!", "yes") == 1.0
    assert vqa_accuracy("no", "yes") == 0.0
    # with 2 references the min(#/3, 1) rule caps the score at 1/3: that is the rule
    assert vqa_accuracy("red", ["red", "red"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "pred, target, expected",
    [
        ("104.9", "100", 1.0),  # 4.9% off: passes
        ("105.1", "100", 0.0),  # 5.1% off: fails
        ("95.1", "100", 1.0),
        ("94.9", "100", 0.0),
        ("105", "100", 1.0),  # exactly 5% passes (<=), despite float rounding
        ("-104.9", "-100", 1.0),
        ("0", "0", 1.0),  # zero target: numeric zero required
        ("0.0", "0", 1.0),
        ("0.01", "0", 0.0),
        ("1,000", "1000", 1.0),  # thousands separators
        ("1,049", "1000", 1.0),
        ("12%", "12", 1.0),  # percent as written
        ("12%", "0.12", 1.0),  # percent as a fraction
        ("12%", "20", 0.0),
        ("Yes", "yes", 1.0),  # non-numeric: case-insensitive exact
        ("Tuesday", "Monday", 0.0),
        ("about 100", "100", 0.0),  # not a number, and not the same string
    ],
)
def test_relaxed_accuracy_chartqa_definition(pred, target, expected):
    assert relaxed_accuracy(pred, target) == expected


def test_relaxed_accuracy_tolerance_is_configurable_and_best_target_counts():
    assert relaxed_accuracy("110", "100", tolerance=0.1) == 1.0
    assert relaxed_accuracy("110", "100") == 0.0
    assert relaxed_accuracy("42", ["7", "42"]) == 1.0


def test_anls():
    assert anls("Hello World", ["hello  world"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)  # 1 edit / 5 chars
    assert anls("ab", ["ac"]) == 0.5  # NL = 0.5 exactly: the official script keeps it
    assert anls("abc", ["axy"]) == 0.0  # NL = 2/3: below the threshold
    assert anls("abc", ["xyz", "abd"]) == pytest.approx(2 / 3)  # best reference counts
    assert anls("", [""]) == 1.0


def test_exact_match_uses_vqa_normalisation():
    assert exact_match("The two dogs.", ["2 dogs"]) == 1.0
    assert exact_match("dogs", ["2 dogs", "cats"]) == 0.0


def test_aggregate_overall_and_per_category():
    result = aggregate(
        ["yes", "no", "2", "red"],
        ["yes", "yes", ["two"], "Red"],
        "exact_match",
        categories=["yesno", "yesno", "count", None],
    )
    assert result == {
        "score": 0.75,
        "n": 4,
        "per_category": {"count": {"score": 1.0, "n": 1}, "yesno": {"score": 0.5, "n": 2}},
    }
    assert aggregate([], [], "vqa") == {"score": 0.0, "n": 0, "per_category": {}}
    assert set(METRICS) == {"vqa", "relaxed", "anls", "exact_match"}
    with pytest.raises(ValueError, match="unknown metric"):
        aggregate(["a"], ["a"], "bleu")
    with pytest.raises(ValueError, match="pair up"):
        aggregate(["a"], [], "vqa")


def test_preference_reward_stats():
    stats = preference_reward_stats([1.0, 0.5, -1.0, 0.0], [0.0, 1.5, -2.0, 0.0], beta=0.1)
    assert stats["reward_accuracy"] == 0.5  # pairs 1 and 3 win; the tie counts as wrong
    assert stats["reward_margin"] == pytest.approx(0.1 * (1.0 - 1.0 + 1.0 + 0.0) / 4)
    assert stats["chosen_reward"] == pytest.approx(0.1 * 0.5 / 4)
    assert stats["rejected_reward"] == pytest.approx(0.1 * -0.5 / 4)
    assert stats["n"] == 4
