"""Shared test setup. Tests never touch a hub: HF_HUB_OFFLINE is forced before transformers is imported."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures_gcs", "tests.fixtures_models"]
