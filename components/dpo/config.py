"""Typed configuration of the DPO step: the shared training settings plus DPO's own."""
from __future__ import annotations

from dataclasses import dataclass, field

from components.common.training.config import TrainingConfig

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down")


@dataclass
class DPOStepConfig(TrainingConfig):
    """``base_model`` is taken from the SFT model's manifest when left empty."""

    beta: float = field(default=0.1, metadata={"help": "DPO temperature: how far the policy may move from the SFT reference."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"DPO loss: one of {', '.join(LOSS_TYPES)}."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (DPO wants a smaller one than SFT)."})
    pairs_from_sft_mistakes: bool = field(default=False, metadata={"help": "Given an SFT dataset (prepare-data --task sft) instead of preference pairs: ask the SFT model every train question and make a pair of each wrong answer (chosen = the gold answer, rejected = the model's)."})
    mistakes_max_new_tokens: int = field(default=32, metadata={"help": "With pairs_from_sft_mistakes: longest generated answer, in tokens."})
    mistakes_batch_size: int = field(default=16, metadata={"help": "With pairs_from_sft_mistakes: rows per generation batch."})

    def validate(self) -> list[str]:
        problems = [p for p in super().validate() if not p.startswith("base_model")]
        if self.beta <= 0:
            problems.append(f"beta must be > 0, got {self.beta}")
        if self.mistakes_max_new_tokens <= 0 or self.mistakes_batch_size <= 0:
            problems.append("mistakes_max_new_tokens and mistakes_batch_size must be > 0")
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"loss_type must be one of {LOSS_TYPES}, not {self.loss_type!r}")
        return problems
