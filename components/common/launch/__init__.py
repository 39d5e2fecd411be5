"""Launching a training step as one multi-node job on the engine the pipeline runs on (Vertex AI CustomJob,
Kubeflow Trainer TrainJob), waiting for it, and handing back the model manifest it published.

    manifest = launch_training("sft", config_dict, nodes=2, gpus_per_node=8,
                               inputs=[("--dataset", dataset.uri)], output_uri=model.uri, checkpoint_uri=ckpt)

Steps may import this room; it imports no step (the step's CLI is named by module path, run inside the job).
"""
from __future__ import annotations

import importlib.util
import uuid
from typing import Callable, Mapping

from components.common.launch.common import (LAUNCH_ENV, LAUNCHERS, Job, LaunchedJobFailed, LaunchError,
                                             LaunchSettings, LaunchSpec, StepCancelled, launch_settings_from_env,
                                             node_command, torchrun_argv, wait_for_job)

__all__ = ["LAUNCH_ENV", "LAUNCHERS", "Job", "LaunchError", "LaunchSettings", "LaunchSpec", "LaunchedJobFailed",
           "StepCancelled", "job_spec", "launch_problems", "launch_settings_from_env", "launch_training",
           "node_command", "torchrun_argv", "wait_for_job"]


def _submitters() -> dict[str, Callable]:
    from components.common.launch import kubeflow, vertex

    return {"vertex": vertex.submit, "kubeflow": kubeflow.submit}


def launch_problems(step: str, nodes: int, settings: LaunchSettings, uris: Mapping[str, str]) -> list[str]:
    """Everything that stops this step from launching its job, before anything is written or submitted."""
    if settings.launcher == "local":
        return [f"{step}_config.nodes={nodes} needs a multi-node launcher, and this run has none (launcher: local, as "
                f"under kfp.local or `vlmtune {step}`): run the pipeline on Vertex AI or Kubeflow (compiled with "
                f"`vlmtune compile --target vertex|kubeflow`, which sets the launcher), or set {step}_config.nodes=1"]
    problems = settings.problems(where=f"${LAUNCH_ENV}")
    if settings.launcher == "kubeflow" and importlib.util.find_spec("kubeflow.trainer") is None:
        problems.append("the Kubeflow Trainer SDK is not installed in this step's image: pip install 'vlmtune[kubeflow]' "
                        "(PyPI `kubeflow`); the images built by `vlmtune images build` include it")
    for flag, uri in uris.items():
        if uri and not str(uri).startswith("gs://"):
            problems.append(f"{flag} is {uri!r}: the job's nodes read inputs and write the model by URI, so a "
                            f"{nodes}-node {step} needs gs:// (use a gs:// pipeline root, and a gs:// checkpoint_uri)")
    return problems


def job_spec(step: str, config: dict, nodes: int, gpus_per_node: int, *, inputs: list[tuple[str, str]],
             output_uri: str, checkpoint_uri: str | None, settings: LaunchSettings, config_uri: str) -> LaunchSpec:
    """The engine-neutral job: every node runs ``vlmtune <step>``'s CLI under torchrun on the same URIs."""
    args = [a for flag, uri in inputs for a in (flag, uri)] + ["--output", output_uri, "--config", config_uri]
    if checkpoint_uri:
        args += ["--checkpoint-uri", checkpoint_uri]
    return LaunchSpec(name=f"vlmtune-{step}-{uuid.uuid4().hex[:8]}", nodes=nodes, gpus_per_node=gpus_per_node,
                      image=settings.image, command=node_command(f"components.{step}.cli", args, gpus_per_node),
                      env=dict(settings.env), output_dir=f"{output_uri.rstrip('/')}.launch")


def launch_training(step: str, config: dict, nodes: int, gpus_per_node: int, *, inputs: list[tuple[str, str]],
                    output_uri: str, checkpoint_uri: str | None, settings: LaunchSettings | None = None,
                    submitters: Mapping[str, Callable] | None = None, **submit_kwargs) -> dict:
    """Check, write the step config beside the output, submit, wait, and return the published model manifest."""
    import yaml

    from components.common import artifacts, storage
    from components.common.schema import MODEL_KIND

    settings = settings or launch_settings_from_env()
    problems = launch_problems(step, nodes, settings, {**dict(inputs), "--output": output_uri,
                                                       "--checkpoint-uri": checkpoint_uri or ""})
    if problems:
        raise LaunchError(f"cannot launch {step} on {nodes} nodes:\n  " + "\n  ".join(problems))
    config_uri = f"{output_uri.rstrip('/')}.launch/config.yaml"
    # The step's config travels as a file next to the output, so every node reads exactly what this step checked.
    storage.write_text(config_uri, yaml.safe_dump(dict(config), sort_keys=True))
    spec = job_spec(step, config, nodes, gpus_per_node, inputs=inputs, output_uri=output_uri,
                    checkpoint_uri=checkpoint_uri, settings=settings, config_uri=config_uri)
    job = (submitters or _submitters())[settings.launcher](spec, settings, **submit_kwargs)
    wait_for_job(job, poll_seconds=settings.poll_seconds)
    try:
        return artifacts.read_manifest(output_uri, kind=MODEL_KIND)
    except artifacts.IncompleteArtifactError as e:
        raise LaunchedJobFailed(f"training job {job.name} succeeded but {output_uri} is not a published model: {e}") from e
