"""Session-scoped fixtures: the tiny model, demo data and prepared datasets, built once per test session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from components.common.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    from components.common.demo_data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo-data"), rows=48, preference_rows=24, seed=0)


@pytest.fixture(scope="session")
def prepared_sft(tmp_path_factory, demo_data_dir, tiny_model_dir):
    from components.common.config import build_config
    from components.prepare_data.config import PrepareDataConfig
    from components.prepare_data.core import run

    out = tmp_path_factory.mktemp("prepared") / "sft"
    run(build_config(PrepareDataConfig, {"task": "sft", "processor": str(tiny_model_dir)}), str(demo_data_dir / "sft"), str(out))
    return out


@pytest.fixture(scope="session")
def prepared_preference(tmp_path_factory, demo_data_dir, tiny_model_dir):
    from components.common.config import build_config
    from components.prepare_data.config import PrepareDataConfig
    from components.prepare_data.core import run

    out = tmp_path_factory.mktemp("prepared") / "preference"
    run(build_config(PrepareDataConfig, {"task": "preference", "processor": str(tiny_model_dir)}),
        str(demo_data_dir / "preference"), str(out))
    return out


TINY_TRAINING = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_steps": 3,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "warmup_ratio": 0.0,
    "lr_scheduler_type": "constant",
    "cpu_threads": 1,
    "lora_dropout": 0.0,
}


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory, prepared_sft, tiny_model_dir):
    from components.common.config import build_config
    from components.sft.config import SFTStepConfig
    from components.sft.core import run

    out = tmp_path_factory.mktemp("models") / "sft"
    run(build_config(SFTStepConfig, {**TINY_TRAINING, "base_model": str(tiny_model_dir)}), str(prepared_sft), str(out))
    return out
