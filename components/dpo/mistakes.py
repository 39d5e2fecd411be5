"""Preference pairs from the SFT model's own mistakes, for users without preference data
(``pairs_from_sft_mistakes``): chosen = the gold answer, rejected = what the SFT model said."""
from __future__ import annotations

from components.common import generation
from components.common.schema import assistant_turn


def _normalise(text: str) -> str:
    return " ".join(str(text).lower().strip().rstrip(".!?").split())


def _text_of(message: dict) -> str:
    return "".join(part.get("text") or "" for part in message["content"] if part.get("type") == "text")


def preference_pairs_from_mistakes(model, processor, rows, batch_size: int = 16, max_new_tokens: int = 32):
    """Preference pairs from a model's own mistakes on labelled SFT rows, for users without preference data.

    Each row's question (the conversation before its last assistant turn) is answered greedily; an answer that
    matches none of the row's reference answers (case, spacing and final punctuation ignored) becomes a pair:
    chosen = the gold assistant turn, rejected = the model's answer (possibly empty). Right answers make no pair.
    Returns (datasets.Dataset of prompt/chosen/rejected/images, counts)."""
    import datasets

    rows = list(rows)
    answers = generation.generate_answers(model, processor, [r["messages"] for r in rows], [r["images"] or [] for r in rows],
                               batch_size=batch_size, options=generation.GenerationOptions(max_new_tokens=max_new_tokens))
    pairs, right, empty = [], 0, 0
    for row, answer in zip(rows, answers):
        gold = row["messages"][-1]
        references = {_normalise(a) for a in (row.get("answers") or [])} | {_normalise(_text_of(gold))}
        if answer.strip() and _normalise(answer) in references:
            right += 1
        else:  # an empty answer (the model stopped at once) is a mistake too: the pair teaches it to answer
            empty += not answer.strip()
            pairs.append({"prompt": generation.prompt_messages(row["messages"]), "chosen": [gold],
                          "rejected": [assistant_turn(answer)], "images": list(row["images"] or [])})
    counts = {"rows": len(rows), "model_right": right, "empty_answers": empty, "pairs": len(pairs)}
    return datasets.Dataset.from_list(pairs) if pairs else None, counts
