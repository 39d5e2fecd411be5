"""The DPO step on the tiny model: it starts from the SFT adapter, moves every adapter tensor, and refuses the wrong dataset.

Run: pytest tests/components/dpo -q
"""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.fixtures_models import TINY_TRAINING


def test_dpo_starts_from_sft_and_moves_every_adapter_tensor(tmp_path, prepared_preference, sft_model_dir):
    from components.common.config import build_config
    from components.dpo.config import DPOStepConfig
    from components.dpo.core import run

    out = tmp_path / "dpo"
    manifest = run(build_config(DPOStepConfig, {**TINY_TRAINING, "max_steps": 2, "learning_rate": 5e-2}),
                   str(prepared_preference), str(sft_model_dir), str(out))
    assert manifest["stage"] == "dpo" and manifest["parent"]["uri"] == str(sft_model_dir)
    assert manifest["metrics"]["global_steps"] == 2
    assert manifest["metrics"]["final_reward_accuracy"] is not None
    sft = load_file(sft_model_dir / "adapter" / "adapter_model.safetensors")
    dpo = load_file(out / "adapter" / "adapter_model.safetensors")
    assert set(dpo) == set(sft), "DPO must save one adapter with the SFT adapter's layout (no 'ref' copy)"
    changed = [k for k in sft if not dpo[k].float().allclose(sft[k].float())]
    assert len(changed) == len(sft), f"unchanged: {sorted(set(sft) - set(changed))}"


def test_dpo_refuses_an_sft_dataset(tmp_path, prepared_sft, sft_model_dir):
    from components.common.config import build_config
    from components.dpo.config import DPOStepConfig
    from components.dpo.core import run

    with pytest.raises(ValueError, match="preference"):
        run(build_config(DPOStepConfig, TINY_TRAINING), str(prepared_sft), str(sft_model_dir), str(tmp_path / "x"))


def test_dpo_logs_eval_loss_on_held_out_pairs(tmp_path, prepared_preference, sft_model_dir):
    import json

    from components.common.config import build_config
    from components.dpo.config import DPOStepConfig
    from components.dpo.core import run

    out = tmp_path / "dpo-eval"
    manifest = run(build_config(DPOStepConfig, {**TINY_TRAINING, "max_steps": 2, "eval_steps": 1, "eval_loss_rows": 3}),
                   str(prepared_preference), str(sft_model_dir), str(out))
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "eval_loss" in h] == [1, 2]
    assert manifest["metrics"]["eval_loss_rows"] == 3 and manifest["metrics"]["last_eval_loss"] is not None
