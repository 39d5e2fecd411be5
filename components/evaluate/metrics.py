"""Answer metrics for evaluating vision-language models: pure functions, no torch.

Every per-example metric has the same shape, ``metric(prediction: str, answers: str | list[str]) -> float`` in
[0, 1], so :data:`METRICS` can be indexed by name, and :func:`aggregate` turns a list of predictions into
``{"score", "n", "per_category"}`` for the report and the gate.

The published metrics keep their published names and follow, to the letter, the script that produced the
numbers papers and model cards report, so a score here can be compared with them:

- ``vqa``: VQAv2 accuracy, GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` as of
  commit a013f0043c1e2cdc995922dfe257f7149aa9af06 (2021-03-11, "Fixed processing answers bug", the current
  master): https://github.com/GT-Vision-Lab/VQA/blob/a013f0043c1e2cdc995922dfe257f7149aa9af06/PythonEvaluationTools/vqaEvaluation/vqaEval.py
- ``relaxed``: ChartQA relaxed accuracy, google-research/pix2struct ``pix2struct/metrics.py``
  ``relaxed_correctness`` as of commit 42e24278b0cc53833bc47bf47d8090b9d3d76775 (copied unchanged, via
  Qwen-VL's ``eval_mm/evaluate_vqa.py``, into lmms-eval's ``chartqa`` task):
  https://github.com/google-research/pix2struct/blob/42e24278b0cc53833bc47bf47d8090b9d3d76775/pix2struct/metrics.py
- ``anls``: DocVQA / InfographicVQA ANLS, the challenge's own evaluation script (``evaluate_method`` of the
  script downloadable from https://rrc.cvc.uab.es/?ch=17 and https://www.docvqa.org; copies circulate as
  ``infographicsvqa_eval.py``, e.g. in OpenGVLab/InternVL ``internvl_chat/eval/vqa/``).

More forgiving variants stay available under their own names, and their docstrings list what they change:

- ``vqa_lenient``: normalises prediction and references always; one reference is a normalised exact match.
- ``relaxed_lenient``: strips spaces and a trailing period, reads thousands separators, lets ``12%`` mean 12 or
  0.12, needs a numeric zero for a zero target, and absorbs float rounding at the tolerance edge.

And one of ours:

- ``exact_match``: VQA-normalised equality with any reference (the demo's primary metric).

Departures from the official scripts that remain (each explained where it is made):

1. ``vqa`` with a single reference: the script's leave-one-out form scores every prediction 0 against one
   answer; here one reference counts as ten identical human answers (a unanimous question), i.e. the script
   run on ``[reference] * 10``: 1.0 when the prediction equals it as the script compares it, else 0.0.
2. ``vqa`` leaves out one reference *by position*; the script leaves out every answer dict equal to the one
   left out, which is one answer in VQAv2 (each dict has its own ``answer_id``). Plain strings have no id.
3. ``vqa`` per-question scores are not rounded; the script stores each one as ``round(100 * acc, 2)`` (its
   overall score is averaged from unrounded values, like ours, and then rounded to 2 decimals of a percent).
4. ``vqa`` runs under Python 3; the script is Python 2. Its regexes are compiled ASCII-only here (``\\d`` is
   ASCII in Python 2 for a ``str`` pattern), ``re.UNICODE`` passed as ``sub``'s count is kept as count=32;
   ``str.lower``/``split`` follow Python 3's Unicode tables, which can differ from Python 2's for rare
   characters.
5. Scores are fractions in [0, 1]; the scripts print percentages (pix2struct ``100 * mean``, vqaEval
   ``round(100 * mean, 2)``). Several references keep the best one, as pix2struct's ``aggregate_metrics`` and
   the DocVQA script do. Per-category means are ours (the scripts' answer types need their own files).

:func:`preference_reward_stats` summarises DPO's implicit rewards on held-out preference pairs.
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Callable, Iterable, Sequence

# --------------------------------------------------------------------------------------------------------------
# VQAv2 answer normalisation: tables as in the official evaluation script, quirks included, so scores are
# comparable with published numbers. (Keys such as "Im" or "Id've" carry capitals and so never match after the
# script lowercases; "somebody'd" maps to "somebodyd": that is the official behaviour and is kept.)
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
# The official regexes, verbatim, compiled ASCII-only as Python 2 (which the script is written for) reads them.
# ``(?!<=\d)`` is a negative *lookahead* for the text "<=" followed by a digit (the author meant a lookbehind),
# so in effect it removes every period not followed by a digit: "end." -> "end", "3.5" stays, "3." -> "3".
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)  # a digit-comma-digit ("1,000") switches marks to deletion
# The script calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in ``count``, so at most
# ``int(re.UNICODE)`` = 32 periods are removed. Kept.
PERIOD_STRIP_COUNT = int(re.UNICODE)
# The script's ``punct`` list. Not in it, so kept as they are: the apostrophe, ":", "%", "$", "#", "&", "*",
# "^", "|", "~" and "." (periods have their own rule above).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")


def _process_punctuation(text: str) -> str:
    # Official rule: a mark touching a space ("yes !") or any text holding a digit-comma-digit is deleted;
    # otherwise it is replaced by a space ("black/white" -> "black white"). The check looks at the input text,
    # the replacements accumulate on the output.
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _vqa_clean(text: str) -> str:
    """What the script does to every answer, normalised or not: newlines and tabs become spaces, ends stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(answer: str) -> str:
    """The VQAv2 normalisation (``processPunctuation`` then ``processDigitArticle``, after the clean-up every
    answer gets): punctuation, lowercase, number words -> digits, articles dropped, contractions.

    >>> normalize_vqa_answer("Two dogs!")
    '2 dogs'
    >>> normalize_vqa_answer("The cat's toy.")
    "cat's toy"
    """
    return _process_digit_article(_process_punctuation(_vqa_clean(answer)))


def _as_list(answers: str | Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    answers = [str(a) for a in answers]
    if not answers:
        raise ValueError("a reference list is empty: every evaluated row needs at least one reference answer")
    return answers


def _leave_one_out(prediction: str, references: list[str]) -> float:
    """``min(1, matches / 3)`` over each subset of all references but one, averaged (the script's loop)."""
    matches = sum(r == prediction for r in references)
    return sum(min(1.0, (matches - (r == prediction)) / 3.0) for r in references) / len(references)


# --------------------------------------------------------------------------------------------------------------
# Per-example metrics
# --------------------------------------------------------------------------------------------------------------
def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """VQAv2 accuracy exactly as the official ``vqaEval.py`` computes it for one question.

    - Every answer and the prediction get newlines/tabs turned into spaces and their ends stripped.
    - Only when the human answers *differ from each other* are they, and the prediction, normalised
      (:func:`normalize_vqa_answer`). When all agree, the prediction is compared as it is: "Yes" or "yes." scores
      0 against ten "yes" (VQAv2's answers are already normalised, and the script relies on it).
    - The score is ``min(1, matches / 3)`` over each of the n subsets of n - 1 answers, averaged: with ten
      answers, 3 matches score 0.9 and 4 or more score 1.0. With 2 or 3 answers the same rule caps the score
      below 1 (1/3 and 2/3): that is the rule, not a bug.

    Departure (the only one in the scoring): a single reference counts as ten identical human answers, so it
    scores 1.0 when the prediction equals it (compared unnormalised, as a unanimous question is) and 0.0
    otherwise. The script itself would score 0 against any single answer, whatever the prediction.
    Use ``vqa_lenient`` to normalise always, or ``exact_match``.

    (Before commit a013f00 the script normalised the prediction always and the differing human answers by
    punctuation only, so numbers computed with that version differ on some questions: "Yes" against ten "yes"
    scored 1.0 there, and "two" against differing answers containing "two" scored 0.)
    """
    refs = [_vqa_clean(a) for a in _as_list(answers)]
    pred = _vqa_clean(prediction)
    if len(set(refs)) > 1:
        refs = [_process_digit_article(_process_punctuation(r)) for r in refs]
        pred = _process_digit_article(_process_punctuation(pred))
    if len(refs) == 1:
        refs = refs * 10
    return _leave_one_out(pred, refs)


def vqa_accuracy_lenient(prediction: str, answers: str | Sequence[str]) -> float:
    """VQAv2 accuracy that always normalises: more forgiving than ``vqa``, so not comparable with papers.

    What it changes from the official script (``vqa``):
    - the prediction and every reference are normalised (:func:`normalize_vqa_answer`) always, also when the
      references agree, so "Yes." matches ten "yes" and "Two" matches a single "2";
    - a single reference is a normalised exact match (1.0 or 0.0).
    The leave-one-out ``min(1, matches / 3)`` rule is the official one, with its cap below 1 for 2 or 3 answers.
    """
    refs = [normalize_vqa_answer(a) for a in _as_list(answers)]
    pred = normalize_vqa_answer(prediction)
    if len(refs) == 1:
        return float(pred == refs[0])
    return _leave_one_out(pred, refs)


def _pix2struct_float(text: str) -> float | None:
    # pix2struct's ``_to_float``: Python's float() on the text as it is (so " 12 ", "1e3", "1_000", "inf" and
    # "nan" parse; "1,000" and "12 apples" do not); a trailing "%" (every trailing "%") divides by 100.
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy exactly as pix2struct's ``relaxed_correctness`` (best target counts).

    When the prediction parses as a number and the target parses as a *non-zero* number, correct means
    ``|prediction - target| / |target| <= tolerance`` (5%, inclusive, on floats: "105" vs "100" passes, "1.05"
    vs "1" fails by float rounding). Otherwise the two strings must be equal ignoring case, nothing stripped.
    What that means, quoted from the script's behaviour:
    - "%": "50%" is read as 0.5, so it matches "0.5" and "50%" but not "50";
    - thousands separators do not parse: "1,000" vs "1000" is a string comparison, and fails;
    - a zero target is compared as a string: "0.0" vs "0" fails, "0" vs "0" passes;
    - surrounding spaces are ignored by float() for numbers (" 12" == "12") but not for strings ("yes " != "yes").
    Use ``relaxed_lenient`` for the forgiving variant.
    """
    best = 0.0
    for tgt in _as_list(target):
        pred_value, tgt_value = _pix2struct_float(prediction), _pix2struct_float(tgt)
        if pred_value is not None and tgt_value:
            hit = abs(pred_value - tgt_value) / abs(tgt_value) <= tolerance
        else:
            hit = prediction.lower() == tgt.lower()
        best = max(best, float(hit))
    return best


def _parse_number_lenient(text: str) -> list[float] | None:
    """Numbers a ChartQA answer may mean: "1,234" -> [1234]; "12%" -> [12, 0.12]; "abc" -> None."""
    text = text.strip().rstrip(".").strip()
    percent = text.endswith("%")
    if percent:
        text = text.rstrip("%").strip()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # thousands separators only
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return [value, value / 100.0] if percent else [value]


def relaxed_accuracy_lenient(prediction: str, target: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy, forgiving variant: scores at least as high as ``relaxed``, so not comparable
    with published ChartQA numbers.

    What it changes from pix2struct's ``relaxed_correctness`` (``relaxed``):
    - surrounding spaces and a trailing period are stripped before parsing and before comparing strings;
    - thousands separators are read: "1,200" == 1200;
    - a value written with "%" means either the number as written or its fraction: "12%" matches 12 and 0.12
      (the official reads only 0.12);
    - a zero target (where the official falls back to string equality, so "0.0" fails against "0") requires the
      prediction to be numerically zero;
    - "inf" and "nan" are not numbers (compared as strings);
    - a 1e-9 slack absorbs float rounding at the exact edge ("1.05" vs "1" at 5% passes).
    With several targets the best one counts.
    """
    best = 0.0
    for tgt in _as_list(target):
        pred_values, tgt_values = _parse_number_lenient(prediction), _parse_number_lenient(tgt)
        if pred_values is not None and tgt_values is not None:
            hit = False
            for p in pred_values:
                for t in tgt_values:
                    if t == 0:
                        hit |= p == 0
                    else:
                        hit |= abs(p - t) / abs(t) <= tolerance + 1e-9
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
    """ANLS for one question exactly as the DocVQA challenge's evaluation script computes it.

    For each reference: the edit distance between the lowercased, whitespace-collapsed strings, divided by the
    longer of the two strings *as given* (the script measures ``len(answer.upper())`` of the raw strings, so
    surrounding or doubled spaces lengthen the denominator: " helo " vs "hello" is 1/6, not 1/5); a distance of
    0 when both are empty. The score is ``1 - the smallest of those``, set to 0 when it is *below* ``threshold``, so a
    normalised distance of exactly 0.5 scores 0.5. (The ST-VQA paper writes "0 if NL >= 0.5", and pix2struct's
    ``anls_metric`` follows the paper; the challenge's leaderboard numbers come from the script.)
    """
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for ref in _as_list(answers):
        longest = max(len(ref.upper()), len(prediction.upper()))
        dist = _levenshtein(" ".join(ref.strip().lower().split()), pred)
        distances.append(0.0 if longest == 0 else dist / longest)
    score = 1.0 - min(distances)
    return 0.0 if score < threshold else score


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the VQA-normalised prediction equals any VQA-normalised reference, else 0.0 (ours: no paper)."""
    pred = normalize_vqa_answer(prediction)
    return float(any(pred == normalize_vqa_answer(a) for a in _as_list(answers)))


MetricFn = Callable[[str, "str | Sequence[str]"], float]

METRICS: dict[str, MetricFn] = {
    "vqa": vqa_accuracy,
    "vqa_lenient": vqa_accuracy_lenient,
    "relaxed": relaxed_accuracy,
    "relaxed_lenient": relaxed_accuracy_lenient,
    "anls": anls,
    "exact_match": exact_match,
}

# One line per metric, for --help and the report.
METRIC_DESCRIPTIONS: dict[str, str] = {
    "vqa": "VQAv2 accuracy, as the official vqaEval.py",
    "vqa_lenient": "VQAv2 accuracy, always normalised (more forgiving than vqa)",
    "relaxed": "ChartQA relaxed accuracy, as pix2struct's relaxed_correctness",
    "relaxed_lenient": "relaxed accuracy reading 1,000 and 12% leniently (more forgiving than relaxed)",
    "anls": "ANLS, as the DocVQA challenge script (threshold 0.5)",
    "exact_match": "VQA-normalised exact match with any reference",
}


def unknown_metric_message(name: str) -> str:
    """``unknown metric 'X'``, with the closest names and the full list."""
    close = difflib.get_close_matches(name, METRICS, n=2, cutoff=0.5)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown metric {name!r}{hint}; choose one of {', '.join(sorted(METRICS))}"


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
        raise ValueError(unknown_metric_message(metric))
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
