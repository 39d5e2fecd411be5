"""DPO without preference data: pairs from the SFT model's own mistakes (chosen = gold, rejected = the model's answer).

Run: pytest tests/components/dpo -q
"""
from __future__ import annotations

from tests.fixtures_models import TINY_TRAINING


def test_preference_pairs_from_the_sft_models_mistakes(prepared_sft, monkeypatch):
    """Chosen = gold, rejected = the model's wrong (or empty) answer; a right answer (any reference,
    case/punctuation aside) makes no pair."""
    from components.common import generation
    from components.common.dataset import load_split
    from components.dpo.mistakes import preference_pairs_from_mistakes

    rows = [dict(r) for r in load_split(str(prepared_sft), "train").select(range(4))]
    golds = [r["messages"][-1]["content"][0]["text"] for r in rows]
    model_answers = [golds[0].upper() + ".", "", "definitely not " + golds[2], "purple"]
    monkeypatch.setattr(generation, "generate_answers", lambda model, processor, conversations, images, **kw: model_answers[:len(conversations)])
    pairs, counts = preference_pairs_from_mistakes(None, None, rows)
    assert counts == {"rows": 4, "model_right": 1, "empty_answers": 1, "pairs": 3}
    assert [p["chosen"][0]["content"][0]["text"] for p in pairs] == golds[1:]
    assert [p["rejected"][0]["content"][0]["text"] for p in pairs] == ["", "definitely not " + golds[2], "purple"]
    assert pairs[1]["prompt"] == rows[2]["messages"][:-1] and len(pairs[1]["images"]) == len(rows[2]["images"]) == 1


def test_dpo_from_an_sft_dataset_trains_on_the_sft_models_mistakes(tmp_path, prepared_sft, sft_model_dir):
    from components.common.config import build_config
    from components.dpo.config import DPOStepConfig
    from components.dpo.core import run

    manifest = run(build_config(DPOStepConfig, {**TINY_TRAINING, "max_steps": 1, "pairs_from_sft_mistakes": True,
                                                "mistakes_max_new_tokens": 4}),
                   str(prepared_sft), str(sft_model_dir), str(tmp_path / "dpo"))
    mistakes = manifest["metrics"]["pairs_from_sft_mistakes"]
    assert mistakes["pairs"] > 0 and mistakes["rows"] == mistakes["pairs"] + mistakes["model_right"]
    assert manifest["metrics"]["global_steps"] == 1 and manifest["metrics"]["final_reward_accuracy"] is not None


def test_beside_a_preference_dataset_the_pairs_come_from_the_sft_data_and_the_eval_loss_from_the_preference_data(
        tmp_path, prepared_sft, prepared_preference, sft_model_dir):
    """The pipeline's shape: DPO is given the preference data and the SFT data; with pairs_from_sft_mistakes the
    train pairs are the SFT model's mistakes on the SFT train split, the held-out loss the preference eval split."""
    from components.common.config import build_config
    from components.common.dataset import open_dataset
    from components.dpo.config import DPOStepConfig
    from components.dpo.core import run

    manifest = run(build_config(DPOStepConfig, {**TINY_TRAINING, "max_steps": 1, "pairs_from_sft_mistakes": True,
                                                "mistakes_max_new_tokens": 4, "eval_steps": 1, "eval_loss_rows": 4}),
                   str(prepared_preference), str(sft_model_dir), str(tmp_path / "dpo"), sft_dataset_uri=str(prepared_sft))
    mistakes = manifest["metrics"]["pairs_from_sft_mistakes"]
    assert mistakes["rows"] == open_dataset(str(prepared_sft)).manifest["splits"]["train"]["rows"]
    assert mistakes["pairs"] > 0 and manifest["metrics"]["train_rows"] == mistakes["pairs"]
    assert manifest["metrics"]["eval_loss_rows"] == 4 and manifest["metrics"]["last_eval_loss"] is not None


def test_pairs_from_mistakes_without_an_sft_dataset_is_refused_before_any_model_is_loaded(tmp_path, prepared_preference, sft_model_dir):
    import pytest

    from components.common.config import build_config
    from components.dpo.config import DPOStepConfig
    from components.dpo.core import run

    with pytest.raises(ValueError, match="--sft-dataset"):
        run(build_config(DPOStepConfig, {**TINY_TRAINING, "pairs_from_sft_mistakes": True}),
            str(prepared_preference), str(sft_model_dir), str(tmp_path / "dpo"))
    assert not (tmp_path / "dpo").exists()


def test_an_sft_model_without_mistakes_trains_on_the_preference_pairs_instead_of_failing_the_run(
        tmp_path, prepared_sft, prepared_preference, sft_model_dir, monkeypatch):
    """Every train row right: no pairs from mistakes. Beside a preference dataset (the pipeline's shape) DPO uses
    its pairs and says so in the metrics; alone (no preference data) it is a clear error naming what to do."""
    import pytest

    from components.common import generation
    from components.common.config import build_config
    from components.common.dataset import open_dataset
    from components.dpo.config import DPOStepConfig
    from components.dpo.core import run

    monkeypatch.setattr(generation, "generate_answers", lambda model, processor, conversations, images, **kw:
                        [c[-1]["content"][0]["text"] for c in conversations])
    config = build_config(DPOStepConfig, {**TINY_TRAINING, "max_steps": 1, "pairs_from_sft_mistakes": True})
    manifest = run(config, str(prepared_preference), str(sft_model_dir), str(tmp_path / "dpo"),
                   sft_dataset_uri=str(prepared_sft))
    mistakes = manifest["metrics"]["pairs_from_sft_mistakes"]
    assert mistakes["pairs"] == 0 and mistakes["fell_back_to_preference_pairs"] is True
    assert manifest["metrics"]["train_rows"] == open_dataset(str(prepared_preference)).manifest["splits"]["train"]["rows"]
    with pytest.raises(ValueError, match="answered all .* right"):
        run(config, str(prepared_sft), str(sft_model_dir), str(tmp_path / "dpo-alone"))
