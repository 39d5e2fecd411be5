"""Typed configuration of the evaluate step."""
from __future__ import annotations

from dataclasses import dataclass, field

from components.evaluate.metrics import METRIC_DESCRIPTIONS, METRICS, unknown_metric_message

_METRIC_HELP = ("Primary metric (the gate compares it): "
                + "; ".join(f"{name}: {METRIC_DESCRIPTIONS[name]}" for name in METRICS)
                + ". vqa, relaxed and anls follow the published scripts; the *_lenient ones score at least as high, so they are not comparable with papers.")


@dataclass
class EvaluateConfig:
    metric: str = field(default="exact_match", metadata={"help": _METRIC_HELP})
    min_delta: float = field(default=0.0, metadata={"help": "Candidate must beat the base model by more than this on the primary metric."})
    min_delta_vs_champion: float = field(default=0.0, metadata={"help": "...and the registry's current champion by at least this."})
    batch_size: int = field(default=16, metadata={"help": "Rows per generate() call."})
    max_new_tokens: int = field(default=16, metadata={"help": "Longest generated answer."})
    max_rows: int = field(default=0, metadata={"help": "Evaluate at most this many eval rows (0: all)."})
    report_samples: int = field(default=12, metadata={"help": "Example rows shown in the report (wins and losses first)."})
    cpu_threads: int = field(default=0, metadata={"help": "torch threads on CPU (0: torch's default)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})

    def validate(self) -> list[str]:
        problems = []
        if self.metric not in METRICS:
            problems.append(f"metric: {unknown_metric_message(self.metric)}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        if self.max_rows < 0:
            problems.append("max_rows must be >= 0")
        return problems
