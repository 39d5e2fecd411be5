"""The evaluate step: held-out rows only, every model scored, gate decided by the rule, reward metrics."""
from __future__ import annotations

import json

import pytest

from components.evaluate.config import EvaluateConfig
from components.evaluate.core import decide_gate
from tests.fixtures_models import TINY_TRAINING


@pytest.mark.parametrize("scores, passed", [
    ({"base": 0.1, "dpo": 0.5}, True),
    ({"base": 0.1, "dpo": 0.15}, False),                    # beats base, but not by more than min_delta
    ({"base": 0.1, "dpo": 0.5, "champion": 0.49}, True),    # beats the champion by >= 0
    ({"base": 0.1, "dpo": 0.5, "champion": 0.6}, False),    # trails the champion
])
def test_gate_rule(scores, passed):
    ok, reasons = decide_gate(scores, "dpo", EvaluateConfig(min_delta=0.1, min_delta_vs_champion=0.0))
    assert ok is passed
    assert len(reasons) == 2


@pytest.fixture(scope="module")
def dpo_model_dir(tmp_path_factory, prepared_preference, sft_model_dir):
    from components.common.config import build_config
    from components.dpo.config import DPOStepConfig
    from components.dpo.core import run

    out = tmp_path_factory.mktemp("models") / "dpo"
    run(build_config(DPOStepConfig, {**TINY_TRAINING, "max_steps": 3, "learning_rate": 5e-2, "beta": 0.5}),
        str(prepared_preference), str(sft_model_dir), str(out))
    return out


def test_evaluate_scores_held_out_rows_only_and_reports(tmp_path, prepared_sft, prepared_preference, sft_model_dir, dpo_model_dir):
    from components.common.config import build_config
    from components.evaluate.core import run
    from components.common.dataset import load_split

    out = tmp_path / "eval"
    manifest = run(build_config(EvaluateConfig, {"max_rows": 6, "batch_size": 3, "max_new_tokens": 3, "cpu_threads": 1, "min_delta": -1.0}),
                   str(prepared_sft), {"sft": str(sft_model_dir), "dpo": str(dpo_model_dir)}, str(out),
                   preference_uri=str(prepared_preference))
    assert manifest["passed"] is True and manifest["candidate"] == "dpo"
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    train_ids = set(load_split(str(prepared_sft), "train")["id"])
    eval_ids = set(load_split(str(prepared_sft), "eval")["id"])
    assert len(predictions) == 6
    assert {p["id"] for p in predictions} <= eval_ids and not {p["id"] for p in predictions} & train_ids
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["scores"]) == {"base", "sft", "dpo"}
    assert set(metrics["by_model"]["dpo"]) >= {"exact_match", "vqa", "relaxed", "anls"}
    pref = metrics["preference"]
    assert pref["n"] > 0 and 0.0 <= pref["reward_accuracy"] <= 1.0 and pref["reference"] == "sft"
    # DPO was trained to move away from the SFT reference, so the implicit rewards are not all zero.
    assert pref["chosen_reward"] != 0.0 or pref["rejected_reward"] != 0.0
    report = (out / "report.md").read_text()
    assert "Preference pairs" in report and "| dpo |" in report and "Gate" in report
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64") >= 2
    # Real model output: whatever the untrained base generates, the report names undecodable bytes as such.
    assert "\ufffd" not in page and "\ufffd" not in report and "**" not in page
    if any("\ufffd" in p[name] for p in predictions for name in ("base", "sft", "dpo")):
        assert "&lt;undecodable bytes&gt;" in page


def test_evaluate_records_exactly_the_champion_it_compared_with(tmp_path, prepared_sft, sft_model_dir):
    """register promotes only if this champion still is one (compare-and-set), so the record must name the very
    version scored, and say so also when there was none."""
    from components.common.config import build_config
    from components.common.registry import open_registry, registry_identity
    from components.evaluate.core import run

    config = build_config(EvaluateConfig, {"max_rows": 2, "batch_size": 2, "max_new_tokens": 2, "cpu_threads": 1,
                                           "min_delta": -1.0})
    registry = str(tmp_path / "registry")
    empty = run(config, str(prepared_sft), {"sft": str(sft_model_dir)}, str(tmp_path / "e0"), registry=registry,
                registry_name="shapes")
    assert empty["champion"] is None
    assert empty["champion_registry"] == {"registry": registry_identity(registry), "name": "shapes"}
    reg = open_registry(registry)
    v1 = reg.register("shapes", str(sft_model_dir), content_hash="a" * 64, metrics={}, lineage={}, card="c")
    manifest = run(config, str(prepared_sft), {"sft": str(sft_model_dir)}, str(tmp_path / "e1"), registry=registry,
                   registry_name="shapes")
    assert manifest["champion"] == {"version": 1, "model_uri": v1.model_uri, "content_hash": "a" * 64}
    assert manifest["models"]["champion"] == v1.model_uri  # the version recorded is the one scored
    assert run(config, str(prepared_sft), {"sft": str(sft_model_dir)}, str(tmp_path / "e2"))["champion_registry"] is None


def test_completion_logprobs_count_only_answer_tokens(tiny_model_dir):
    import torch
    from PIL import Image

    from components.common.modeling import load_for_inference
    from components.common.schema import assistant_turn, user_turn
    from components.evaluate.core import completion_logprobs

    model, processor = load_for_inference(str(tiny_model_dir))
    image = Image.new("RGB", (128, 128), "red")
    rows = [{"prompt": [user_turn("What colour is the shape?")], "chosen": [assistant_turn("red")], "images": [image]}]
    (logp,) = completion_logprobs(model, processor, rows, "chosen")
    # By hand: the answer is " red" + <end_of_utterance>, scored at the two positions that predict them.
    text = processor.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"])
    enc = processor(text=[text], images=[[image]], add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(**enc).logits[0].float(), -1)
    ids = enc["input_ids"][0].tolist()
    answer = [processor.tokenizer.convert_tokens_to_ids("Ġred"), processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")]
    start = max(i for i in range(len(ids) - 1) if ids[i:i + 2] == answer)
    expected = float(logprobs[start - 1, answer[0]] + logprobs[start, answer[1]])
    assert logp == pytest.approx(expected, abs=1e-4)
