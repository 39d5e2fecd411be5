"""The settings SFT and DPO share (model loading, LoRA, optimisation, checkpoints), with the LoRA target
patterns of the Idefics3/SmolVLM module names. Each step's config extends :class:`TrainingConfig`. Defaults
suit a real SmolVLM on a GPU; the demo config tunes them for the tiny demo model on a CPU."""
from __future__ import annotations

from dataclasses import dataclass, field

METHODS = ("qlora", "lora", "full")
QUANTIZATIONS = ("none", "4bit", "8bit")
TEXT_LORA_TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
VISION_LORA_TARGETS = r".*vision_model.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$"


@dataclass
class TrainingConfig:
    """Settings shared by the SFT and DPO steps (model loading, LoRA, optimisation, checkpoints)."""

    base_model: str = field(default="", metadata={"help": "Base model: folder, gs:// folder or hub id (e.g. HuggingFaceTB/SmolVLM-256M-Instruct)."})
    method: str = field(default="qlora", metadata={"help": "qlora (4-bit base + LoRA), lora (full-precision base + LoRA) or full."})
    quantization: str | None = field(default=None, metadata={"help": "none|4bit|8bit; default: 4bit for qlora, none otherwise."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    lora_targets: str = field(default="text", metadata={"help": "text | text+vision | a regex of module names."})
    trainable_modules: list[str] = field(default_factory=lambda: ["connector", "lm_head"], metadata={"help": "Modules trained in full beside the adapter (PEFT modules_to_save)."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the train split."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimiser steps (-1: use epochs)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Rows per device per step."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Micro-batches per optimiser step."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of steps for linear warm-up."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_length: int = field(default=2048, metadata={"help": "Token budget per row; longer rows are dropped and counted, never truncated."})
    max_too_long_fraction: float = field(default=0.05, metadata={"help": "Fail if more than this share of rows is over max_length."})
    group_by_length: bool = field(default=True, metadata={"help": "Batch rows of similar length to cut padding."})
    gradient_checkpointing: str = field(default="auto", metadata={"help": "auto | true | false. auto: on for CUDA; on a CPU only when a batch's activations (batch x longest row x text layers x hidden x 136 B) reach 2 GiB, e.g. SmolVLM-256M at 2048 px images, not at 512 px (there it costs 2.3x the time for 4% less memory: benchmarks/gradient_checkpointing.py)."})
    seed: int = field(default=42, metadata={"help": "Seed for data order, LoRA init and dropout."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimiser steps."})
    save_steps: int = field(default=200, metadata={"help": "Checkpoint every N steps to checkpoint_uri."})
    eval_steps: int = field(default=0, metadata={"help": "Loss on held-out eval rows every N optimiser steps, beside the training loss in the loss curve (0: off). Only reported: no checkpoint is chosen by it."})
    eval_loss_rows: int = field(default=64, metadata={"help": "With eval_steps: the first N eval rows (0: all) are scored, so each check stays cheap."})
    merge_adapter: bool = field(default=False, metadata={"help": "Also write a merged full model (base reloaded in full precision)."})
    cpu_threads: int = field(default=0, metadata={"help": "torch threads on CPU (0: torch's default). Tiny models train fastest on 1."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub (off unless you trust it)."})
    nodes: int = field(default=1, metadata={"help": "Machines to train on. 1: in the step's own container; >1: the step launches one multi-node job (Vertex AI CustomJob / Kubeflow TrainJob) and waits."})
    gpus_per_node: int = field(default=1, metadata={"help": "GPUs (torchrun processes) per node of a launched multi-node job; nodes=1 uses the step's own container as it is."})

    def resolved_quantization(self) -> str:
        if self.quantization:
            return self.quantization
        return "4bit" if self.method == "qlora" else "none"

    def validate(self) -> list[str]:
        problems = []
        if not self.base_model:
            problems.append("base_model is required (a folder, gs:// folder or hub id)")
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, not {self.method!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization must be one of {QUANTIZATIONS}, not {self.quantization!r}")
        if self.method == "full" and self.resolved_quantization() != "none":
            problems.append("method=full cannot train quantised weights; use quantization=none or method=qlora")
        if self.method == "qlora" and self.resolved_quantization() == "none":
            problems.append("method=qlora needs quantization 4bit or 8bit; use method=lora for a full-precision base")
        for name in ("nodes", "gpus_per_node", "lora_r", "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "logging_steps", "save_steps"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.eval_steps < 0 or self.eval_loss_rows < 0:
            problems.append(f"eval_steps and eval_loss_rows must be >= 0, got {self.eval_steps} and {self.eval_loss_rows}")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            problems.append("set num_train_epochs > 0 or max_steps > 0")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.max_too_long_fraction <= 1:
            problems.append(f"max_too_long_fraction must be in [0, 1], got {self.max_too_long_fraction}")
        if str(self.gradient_checkpointing).lower() not in ("auto", "true", "false"):
            problems.append(f"gradient_checkpointing must be auto, true or false, not {self.gradient_checkpointing!r}")
        return problems
