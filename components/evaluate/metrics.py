"""Answer metrics for evaluating vision-language models: pure functions, no torch.

Every per-example metric has the same shape, ``metric(prediction: str, answers: str | list[str]) -> float`` in
[0, 1], so :data:`METRICS` can be indexed by the task type a dataset row declares, and :func:`aggregate` turns a
list of predictions into ``{"score", "n", "per_category"}`` for the report and the gate.

- ``vqa``: VQAv2 accuracy with the official answer normalisation (:func:`normalize_vqa_answer`).
- ``relaxed``: ChartQA relaxed accuracy (numbers within 5% relative error, else case-insensitive match).
- ``anls``: Average Normalised Levenshtein Similarity (DocVQA / ST-VQA), threshold 0.5.
- ``exact_match``: VQA-normalised equality with any reference.

:func:`preference_reward_stats` summarises DPO's implicit rewards on held-out preference pairs.

Sources followed: the VQA evaluation script (``vqaEval.py`` of GT-Vision-Lab/VQA, its ``contractions``,
``manualMap``, ``articles``, ``periodStrip``, ``commaStrip`` and ``punct`` tables and the leave-one-out accuracy),
and ChartQA's ``relaxed_correctness`` (as used by pix2struct / MatCha / PaliGemma evaluations).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Sequence

# --------------------------------------------------------------------------------------------------------------
# VQAv2 answer normalisation: tables copied from the official evaluation script, quirks included, so scores are
# comparable with published numbers. (Keys such as "Im" or "Id've" carry capitals and so never match after the
# script lowercases: that is the official behaviour and is kept.)
# --------------------------------------------------------------------------------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {  # the script's ``manualMap``: only zero..ten (and "none") become digits
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
# Official regex, verbatim. ``(?!<=\d)`` is a negative *lookahead* for the text "<=" followed by a digit (the
# author meant a lookbehind), so in effect it removes every period not followed by a digit: "end." -> "end",
# "3.5" stays, "3." -> "3".
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")  # a comma between digits ("1,000") switches punctuation to deletion
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")


def _process_punctuation(text: str) -> str:
    # Official rule: a mark touching a space ("yes !") or any text holding a digit-comma-digit is deleted;
    # otherwise it is replaced by a space ("black/white" -> "black white"). The check looks at the input text.
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The script passes re.UNICODE as ``sub``'s third positional argument, i.e. count=32; we strip all periods
    # (identical for any answer with fewer than 32 periods).
    return PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """The VQAv2 normalisation: whitespace, punctuation, lowercase, number words -> digits, articles, contractions.

    >>> normalize_vqa_answer("Two dogs!")
    '2 dogs'
    >>> normalize_vqa_answer("The cat's toy.")
    "cat's toy"
    """
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def _as_list(answers: str | Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    answers = [str(a) for a in answers]
    if not answers:
        raise ValueError("a reference list is empty: every evaluated row needs at least one reference answer")
    return answers


# --------------------------------------------------------------------------------------------------------------
# Per-example metrics
# --------------------------------------------------------------------------------------------------------------
def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """VQAv2 accuracy: ``min(#humans who gave the prediction / 3, 1)``, in the official averaged form.

    The official script scores a prediction against each of the n subsets of n-1 human answers (for VQAv2's
    ten answers: the 10-choose-9 subsets) and averages ``min(matches_in_subset / 3, 1)``. So with 10 answers,
    3 matches score 0.9 (not 1.0) and 4 or more score 1.0.

    Two deliberate differences from the script, both documented here:
    - The script normalises answers only when the human answers disagree (VQAv2 ground truth is already
      normalised). Our references are free text and predictions are raw generations, so both sides are always
      normalised.
    - With a single reference the leave-one-out form would always give 0; a single reference is scored by
      normalised exact match instead. With 2 or 3 references the official form is kept, so the score is capped
      below 1 (max 1/3 and 2/3): that is the rule, not a bug. Use ``exact_match`` for such data.
    """
    refs = [normalize_vqa_answer(a) for a in _as_list(answers)]
    pred = normalize_vqa_answer(prediction)
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    total = 0.0
    for r in refs:  # leave out one reference at a time
        in_subset = matches - (r == pred)
        total += min(in_subset / 3.0, 1.0)
    return total / len(refs)


def _parse_number(text: str) -> list[float] | None:
    """Numbers a ChartQA answer may mean: "1,234" -> [1234]; "12%" -> [12, 0.12]; "abc" -> None."""
    text = text.strip().rstrip(".").strip()
    percent = text.endswith("%")
    if percent:
        text = text[:-1].strip()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # thousands separators only
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return [value, value / 100.0] if percent else [value]


def relaxed_accuracy(prediction: str, target: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: a number within ``tolerance`` relative error of the target, else exact string match.

    Follows ChartQA's ``relaxed_correctness``: ``|pred - target| / |target| <= tolerance`` when both parse as
    numbers, otherwise case-insensitive string equality. Additions, each documented:
    - thousands separators are ignored ("1,200" == 1200) and a trailing period is dropped;
    - a value written with "%" may mean either the number as written or its fraction ("12%" matches 12 and
      0.12): chart labels and answers mix both conventions;
    - a zero target (where the relative error is undefined and ChartQA falls back to string equality, so "0.0"
      fails against "0") requires the prediction to be numerically zero;
    - a 1e-9 slack absorbs float rounding at the exact edge (105 vs 100 at 5% passes).
    With several targets the best one counts.
    """
    best = 0.0
    for tgt in _as_list(target):
        pred_values, tgt_values = _parse_number(prediction), _parse_number(tgt)
        if pred_values is not None and tgt_values is not None:
            ok = False
            for p in pred_values:
                for t in tgt_values:
                    if t == 0:
                        ok |= p == 0
                    else:
                        ok |= abs(p - t) / abs(t) <= tolerance + 1e-9
            hit = ok
        else:
            hit = prediction.strip().lower() == tgt.strip().lower()
        best = max(best, float(hit))
    return best


def _levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity for one question, as the DocVQA / ST-VQA evaluation script computes it.

    ``NL = levenshtein(pred, ref) / max(len(pred), len(ref))`` on lowercased, whitespace-collapsed strings; the
    best reference counts; the score ``1 - min NL`` is zeroed when it falls below ``threshold``. (The papers write
    "0 if NL >= 0.5"; the official script zeroes only when ``1 - NL < 0.5``, so NL = 0.5 exactly scores 0.5. We follow
    the script, which produced the published numbers.)
    """
    pred = " ".join(prediction.lower().split())
    distances = []
    for ref in _as_list(answers):
        ref = " ".join(ref.lower().split())
        longest = max(len(pred), len(ref))
        distances.append(_levenshtein(pred, ref) / longest if longest else 0.0)
    score = 1.0 - min(distances)
    return score if score >= threshold else 0.0


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the VQA-normalised prediction equals any VQA-normalised reference, else 0.0."""
    pred = normalize_vqa_answer(prediction)
    return float(any(pred == normalize_vqa_answer(a) for a in _as_list(answers)))


MetricFn = Callable[[str, "str | Sequence[str]"], float]

METRICS: dict[str, MetricFn] = {
    "vqa": vqa_accuracy,
    "relaxed": relaxed_accuracy,
    "anls": anls,
    "exact_match": exact_match,
}


def aggregate(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    metric: str | MetricFn,
    categories: Sequence[str | None] | None = None,
) -> dict:
    """Mean of a per-example metric, overall and per category.

    Returns ``{"score": mean, "n": n, "per_category": {category: {"score": mean, "n": n}}}``. Rows whose
    category is None are counted overall only; ``per_category`` is empty without categories. An empty input
    scores 0.0 with n=0 (so a gate comparing scores fails closed rather than crashing).
    """
    fn = METRICS[metric] if isinstance(metric, str) and metric in METRICS else metric
    if isinstance(fn, str):
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: they must pair up")
    if categories is not None and len(categories) != len(predictions):
        raise ValueError(f"{len(categories)} categories for {len(predictions)} predictions: they must pair up")
    scores = [fn(p, r) for p, r in zip(predictions, references)]
    per: dict[str, list[float]] = {}
    for score, cat in zip(scores, categories or [None] * len(scores)):
        if cat is not None:
            per.setdefault(str(cat), []).append(score)
    return {
        "score": _mean(scores),
        "n": len(scores),
        "per_category": {c: {"score": _mean(v), "n": len(v)} for c, v in sorted(per.items())},
    }


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def preference_reward_stats(
    chosen_logratios: Sequence[float], rejected_logratios: Sequence[float], beta: float
) -> dict:
    """DPO implicit-reward summary on preference pairs.

    Inputs are per-pair ``log pi(y|x) - log pi_ref(y|x)`` summed over the response tokens, for the chosen and the
    rejected response. DPO's implicit reward is ``beta * logratio``. Returns ``reward_accuracy`` (share of pairs
    whose chosen reward is strictly higher, as TRL logs it: ties count as wrong), ``reward_margin`` (mean chosen
    minus rejected reward), the mean ``chosen_reward`` / ``rejected_reward`` and ``n``.
    """
    if len(chosen_logratios) != len(rejected_logratios):
        raise ValueError(
            f"{len(chosen_logratios)} chosen but {len(rejected_logratios)} rejected log-ratios: they must pair up"
        )
    chosen = [beta * float(c) for c in chosen_logratios]
    rejected = [beta * float(r) for r in rejected_logratios]
    return {
        "reward_accuracy": _mean(float(c > r) for c, r in zip(chosen, rejected)),
        "reward_margin": _mean(c - r for c, r in zip(chosen, rejected)),
        "chosen_reward": _mean(chosen),
        "rejected_reward": _mean(rejected),
        "n": len(chosen),
    }
