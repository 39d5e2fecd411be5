"""Metric tests: each expected value is what the official script gives (GT-Vision-Lab/VQA vqaEval.py,
pix2struct relaxed_correctness, the DocVQA ANLS script), worked out from its code and checked against it."""
import pytest

from components.evaluate.metrics import (
    METRICS,
    aggregate,
    anls,
    exact_match,
    normalize_vqa_answer,
    preference_reward_stats,
    relaxed_accuracy,
    relaxed_accuracy_lenient,
    unknown_metric_message,
    vqa_accuracy,
    vqa_accuracy_lenient,
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


def test_vqa_normalisation_keeps_what_the_official_lists_leave_out():
    # ":" and "%" are not in the script's punct list; a period between digits stays.
    assert normalize_vqa_answer("3:30") == "3:30"
    assert normalize_vqa_answer("50%") == "50%"
    assert normalize_vqa_answer("$5.50") == "$5.50"
    # re.UNICODE passed as sub()'s count: at most 32 periods are removed, the rest stay.
    assert normalize_vqa_answer("red" + "." * 40) == "red" + "." * 8
    # Python 2 reads the script's \d as ASCII: a period before a non-ASCII digit is removed.
    assert normalize_vqa_answer("3.\u0663") == "3\u0663"


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)])
def test_vqa_accuracy_official_leave_one_out_form_on_ten_answers(matches, expected):
    # The answers differ, so both sides are normalised ("two" -> "2"); ten "2" would be unanimous (see below).
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_only_when_the_human_answers_differ():
    # Unanimous answers: the script compares the prediction as it is (after newline/tab clean-up and strip).
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    # Differing answers: both sides are normalised (punctuation, case, number words, articles, contractions).
    assert vqa_accuracy("Yes!", ["yes"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("The dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dont", ["don't"] * 4 + ["no"] * 6) == 1.0
    # Answers that differ only in punctuation count as differing, and agree once normalised.
    assert vqa_accuracy("Yes", ["yes", "yes!"] * 5) == 1.0


def test_vqa_accuracy_few_references():
    # One reference counts as ten identical answers (the script alone would give 0 for any prediction).
    assert vqa_accuracy("yes", "yes") == 1.0
    assert vqa_accuracy("yes", ["yes"]) == 1.0
    assert vqa_accuracy("Yes", "yes") == 0.0  # compared as a unanimous question is: unnormalised
    assert vqa_accuracy("no", "yes") == 0.0
    # Two or three references: the script's leave-one-out rule caps the score below 1.
    assert vqa_accuracy("red", ["red", "red"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("red", ["red", "red", "red"]) == pytest.approx(2 / 3)


def test_vqa_lenient_normalises_always():
    assert vqa_accuracy_lenient("Yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy_lenient("yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy_lenient("Two", "2") == 1.0
    assert vqa_accuracy_lenient("The Dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy_lenient("no", "yes") == 0.0
    assert vqa_accuracy_lenient("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # same leave-one-out rule
    assert vqa_accuracy_lenient("red", ["red", "red"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "pred, target, expected",
    [
        # numbers: within 5% of the target, inclusive, on floats
        ("104.9", "100", 1.0),
        ("105.1", "100", 0.0),
        ("95.1", "100", 1.0),
        ("94.9", "100", 0.0),
        ("105", "100", 1.0),  # |105 - 100| / 100 == 0.05 exactly
        ("1.05", "1", 0.0),  # 0.05000000000000004 > 0.05: float rounding fails it, as in pix2struct
        ("-104.9", "-100", 1.0),
        ("1e3", "1000", 1.0),  # Python's float() spellings parse
        (" 12", "12", 1.0),  # float() ignores surrounding spaces...
        ("yes ", "yes", 0.0),  # ...but the string comparison does not
        # "%": the value divided by 100
        ("50%", "0.5", 1.0),
        ("50%", "50", 0.0),
        ("50%", "50%", 1.0),
        ("12 %", "0.12", 1.0),
        ("100%", "96%", 1.0),
        ("100%", "94%", 0.0),
        # thousands separators do not parse: compared as strings
        ("1,000", "1000", 0.0),
        ("1,000", "1,000", 1.0),
        ("1,049", "1,000", 0.0),
        # a zero target is compared as a string
        ("0", "0", 1.0),
        ("0.0", "0", 0.0),
        ("0.01", "0", 0.0),
        # non-numbers: equal ignoring case
        ("Yes", "yes", 1.0),
        ("Tuesday", "Monday", 0.0),
        ("about 100", "100", 0.0),
        ("nan", "nan", 0.0),  # "nan" parses, and nothing is within 5% of NaN
    ],
)
def test_relaxed_accuracy_is_pix2struct_relaxed_correctness(pred, target, expected):
    assert relaxed_accuracy(pred, target) == expected


def test_relaxed_accuracy_reproduces_pix2struct_metrics_test():
    # pix2struct/metrics_test.py test_pix2struct_metrics: relaxed_accuracy 62.5 on these eight pairs.
    predictions = ["abc", "abc", "Abc", "100%", "100%", "100%", "100%", "Don't"]
    targets = [["abc"], ["Abc"], ["abc"], ["96%"], ["94%"], ["0.96"], ["0.94"], ["Won't"]]
    assert aggregate(predictions, targets, "relaxed")["score"] == pytest.approx(0.625)


def test_relaxed_accuracy_tolerance_is_configurable_and_best_target_counts():
    assert relaxed_accuracy("110", "100", tolerance=0.1) == 1.0
    assert relaxed_accuracy("110", "100") == 0.0
    assert relaxed_accuracy("42", ["7", "42"]) == 1.0


@pytest.mark.parametrize(
    "pred, target, expected",
    [
        ("105", "100", 1.0),
        ("1.05", "1", 1.0),  # the 1e-9 slack absorbs float rounding at the edge
        ("105.1", "100", 0.0),
        ("0", "0", 1.0),
        ("0.0", "0", 1.0),  # zero target: numeric zero required
        ("0.01", "0", 0.0),
        ("1,000", "1000", 1.0),  # thousands separators read
        ("1,049", "1000", 1.0),
        ("12%", "12", 1.0),  # percent as written...
        ("12%", "0.12", 1.0),  # ...or as a fraction
        ("12%", "20", 0.0),
        (" 12. ", "12", 1.0),  # spaces and a trailing period stripped
        ("yes ", "Yes", 1.0),
        ("Tuesday", "Monday", 0.0),
        ("inf", "inf", 1.0),  # not a number here: equal strings
    ],
)
def test_relaxed_lenient_changes_what_its_docstring_says(pred, target, expected):
    assert relaxed_accuracy_lenient(pred, target) == expected


def test_lenient_variants_never_score_below_the_official_ones():
    words = ["yes", "Yes", "yes.", " yes", "2", "two", "Two", "0", "0.0", "12", "12%", "0.12", "1,000", "1000",
             "50%", "nan", "inf", "1.05", "1", "the dog", "Dog"]
    for pred in words:
        for a in words:
            assert relaxed_accuracy_lenient(pred, a) >= relaxed_accuracy(pred, a), (pred, a)
            for refs in ([a], [a] * 10, [a] * 5 + [pred] * 5, [a] * 7 + ["x"] * 3):
                assert vqa_accuracy_lenient(pred, refs) >= vqa_accuracy(pred, refs), (pred, refs)


def test_anls_is_the_docvqa_script():
    assert anls("Hello World", ["hello  world"]) == 1.0  # lowercased, whitespace collapsed
    assert anls("helo", ["hello"]) == pytest.approx(0.8)  # 1 edit / 5 chars
    # The denominator is the longer string as given, spaces included: 1 edit / len(" helo ") = 1/6.
    assert anls(" helo ", ["hello"]) == pytest.approx(1 - 1 / 6)
    # Exactly 0.5: the script zeroes only scores *below* the threshold, so 0.5 stays.
    assert anls("ab", ["ac"]) == 0.5
    assert anls("abcdefghij", ["abcdevwxyz"]) == 0.5  # 5 edits / 10
    assert anls("abcdefghi", ["abcdvwxyz"]) == 0.0  # 5 edits / 9: 0.444 < 0.5
    assert anls("abc", ["axy"]) == 0.0  # NL = 2/3
    assert anls("abc", ["xyz", "abd"]) == pytest.approx(2 / 3)  # best reference counts
    assert anls("", [""]) == 1.0
    assert anls("", ["abc"]) == 0.0
    assert anls("abc", ["abd"], threshold=0.7) == 0.0  # 0.667 < 0.7


def test_exact_match_uses_vqa_normalisation_on_both_sides_always():
    assert exact_match("The two dogs.", ["2 dogs"]) == 1.0
    assert exact_match("dogs", ["2 dogs", "cats"]) == 0.0
    # Unchanged by vqa following the script: exact_match normalises even a single or unanimous reference.
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("Red", ["red"] * 10) == 1.0


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
    assert set(METRICS) == {"vqa", "vqa_lenient", "relaxed", "relaxed_lenient", "anls", "exact_match"}
    with pytest.raises(ValueError, match="unknown metric 'bleu'; choose one of anls, exact_match, relaxed"):
        aggregate(["a"], ["a"], "bleu")
    with pytest.raises(ValueError, match="pair up"):
        aggregate(["a"], [], "vqa")


def test_unknown_metric_names_the_closest():
    assert unknown_metric_message("relaxed_accuracy").startswith(
        "unknown metric 'relaxed_accuracy' (did you mean 'relaxed' or 'relaxed_lenient'?)")
    assert "did you mean 'vqa'" in unknown_metric_message("vqa2")
    from components.evaluate.config import EvaluateConfig

    (problem,) = EvaluateConfig(metric="exact").validate()
    assert problem.startswith("metric: unknown metric 'exact' (did you mean 'exact_match'?)")
    assert EvaluateConfig().metric == "exact_match" and EvaluateConfig().validate() == []


def test_preference_reward_stats():
    stats = preference_reward_stats([1.0, 0.5, -1.0, 0.0], [0.0, 1.5, -2.0, 0.0], beta=0.1)
    assert stats["reward_accuracy"] == 0.5  # pairs 1 and 3 win; the tie counts as wrong
    assert stats["reward_margin"] == pytest.approx(0.1 * (1.0 - 1.0 + 1.0 + 0.0) / 4)
    assert stats["chosen_reward"] == pytest.approx(0.1 * 0.5 / 4)
    assert stats["rejected_reward"] == pytest.approx(0.1 * -0.5 / 4)
    assert stats["n"] == 4
