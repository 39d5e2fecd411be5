"""Typed configuration of the SFT step: the shared training settings (``TrainingConfig``), nothing more yet.
Defaults suit a real SmolVLM on a GPU; the demo config tunes them for the tiny demo model on a CPU."""
from __future__ import annotations

from dataclasses import dataclass

from components.common.training.config import TrainingConfig


@dataclass
class SFTStepConfig(TrainingConfig):
    """The SFT step's config (all of TrainingConfig)."""
