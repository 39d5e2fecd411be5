"""KFP component for register: the body only calls the core. The pipeline runs it under `dsl.If(passed)`."""
from typing import NamedTuple

from kfp.dsl import Artifact, Dataset, Input, Model


def register(model: Input[Model], evaluation: Input[Artifact], dataset: Input[Dataset], registry: str,
             name: str) -> NamedTuple("RegisterOutputs", version=int, model_uri=str):
    import sys
    from collections import namedtuple

    from components.common.cli import reported_failure
    from components.register.core import run

    with reported_failure():
        result = run(model.path, evaluation.path, registry, name, dataset_uri=dataset.path)
    if result["reason"]:  # registered, not promoted: the champion changed since the evaluation (not a failure)
        print(f"register: {result['reason']}", file=sys.stderr)
    outputs = namedtuple("RegisterOutputs", ["version", "model_uri"])
    return outputs(int(result["version"]), str(result["model_uri"]))
