"""Run the whole pipeline on one machine with kfp.local (the embedded default: no cloud, no Docker).

SubprocessRunner(use_venv=False) runs every step in this interpreter's environment; DockerRunner runs each
step in its image (GPU passed through), exactly as Vertex AI or Kubeflow would. kfp's own cache makes a
second run with the same inputs skip finished steps.

With a ``console`` (:class:`pipelines.console.StepConsole`, already capturing this process's output) the run
is shown one line per step and a failed step raises :class:`~pipelines.console.StepFailed` with its exit
status and last lines; without one, kfp's own output streams as it comes and a failure is kfp's RuntimeError.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from components.common.cli import quiet_known_notices
from pipelines.pipeline import PipelineSettings, build_pipeline

log = logging.getLogger(__name__)


def run_local(
    params: dict[str, Any],
    pipeline_root: str | Path,
    *,
    runner: str = "subprocess",
    caching: bool = True,
    settings: PipelineSettings | None = None,
    gpus: str | None = None,
    console=None,
) -> dict[str, Any]:
    """Run the pipeline; returns {"evaluation": path, "model": path, "seconds": s}."""
    from kfp import local

    quiet_known_notices()
    pipeline_root = Path(pipeline_root).absolute()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    if runner == "subprocess":
        kfp_runner = local.SubprocessRunner(use_venv=False)
        settings = settings or PipelineSettings()
    elif runner == "docker":
        from pipelines.containers import docker_runner_kwargs

        kfp_runner = local.DockerRunner(**docker_runner_kwargs(gpus=gpus, mounts=_local_paths(params)))
        settings = settings or PipelineSettings(gpu_images=bool(gpus))
    else:
        raise ValueError(f"runner must be subprocess or docker, not {runner!r}")
    local.init(runner=kfp_runner, pipeline_root=str(pipeline_root), raise_on_error=True,
               enable_caching=caching, cache_root=str(pipeline_root / ".cache"))
    pipeline = build_pipeline(settings)
    if console is not None:
        console.describe(pipeline)
    started = time.time()
    try:
        task = pipeline(**params)
    except RuntimeError as error:
        if console is not None and console.failed is not None:
            raise console.failure(error) from error
        raise
    return {
        "evaluation": task.outputs["evaluation"].path,
        "model": task.outputs["model"].path,
        "seconds": time.time() - started,
    }


def _local_paths(params: dict[str, Any]) -> list[str]:
    return [v for v in params.values() if isinstance(v, str) and v.startswith("/") and Path(v).exists()]
