"""Vertex AI launcher: one ``CustomJob`` with a chief pool (1 replica) and a worker pool (nodes - 1 replicas), the
same image and command on each, machine and accelerators per node from the launch settings.

Vertex AI sets ``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE`` (nodes)/``RANK`` (node index) on every replica of a
multi-pool job; the node entry point (``launch/node.py``) turns them into torchrun's flags. The job runs as the
configured service account; the hub token is never put into the request: the job gets the Secret Manager version's
*name* in ``$VLMTUNE_SECRET_ENV`` and reads the value on the node.
"""
from __future__ import annotations

from typing import Iterator

from components.common.launch.common import SECRET_ENV, LaunchSettings, LaunchSpec

STATE_NAMES = {"JOB_STATE_SUCCEEDED": "succeeded", "JOB_STATE_FAILED": "failed", "JOB_STATE_CANCELLED": "cancelled",
               "JOB_STATE_EXPIRED": "failed"}


def worker_pool_specs(spec: LaunchSpec, settings: LaunchSettings) -> list[dict]:
    """workerPoolSpecs[0] is the chief (exactly one replica), [1] the other nodes: identical machines and command."""
    machine = {"machine_type": settings.machine_type}
    if settings.accelerator_type:
        machine.update(accelerator_type=settings.accelerator_type, accelerator_count=spec.gpus_per_node)
    env = dict(spec.env)
    if settings.hub_token_secret_version:
        env[SECRET_ENV] = f"HF_TOKEN={settings.hub_token_secret_version}"
    container = {"image_uri": spec.image, "command": list(spec.command),
                 "env": [{"name": k, "value": v} for k, v in sorted(env.items())]}
    pools = [{"machine_spec": machine, "replica_count": 1, "container_spec": container}]
    if spec.nodes > 1:
        pools.append({"machine_spec": dict(machine), "replica_count": spec.nodes - 1, "container_spec": dict(container)})
    return pools


class VertexJob:
    """A submitted CustomJob, seen through the shape :func:`common.wait_for_job` polls."""

    def __init__(self, job):
        self.job = job
        self.name = job.resource_name

    def poll(self) -> tuple[str, str | None]:
        state = STATE_NAMES.get(self.job.state.name, "running")  # .state re-reads the job (GetCustomJob)
        error = None
        if state in ("failed", "cancelled"):
            status = self.job.error
            error = (status.message if status is not None else "") or None
        return state, error

    def cancel(self) -> None:
        self.job.cancel()

    def new_log_lines(self) -> Iterator[str]:
        # The nodes' logs go to Cloud Logging (the console link is printed on submit); only state is polled here.
        return iter(())


def submit(spec: LaunchSpec, settings: LaunchSettings, *, credentials=None) -> VertexJob:
    """Create the CustomJob (``JobServiceClient.create_custom_job``) and return its handle."""
    from google.cloud import aiplatform

    job = aiplatform.CustomJob(
        display_name=spec.name,
        worker_pool_specs=worker_pool_specs(spec, settings),
        base_output_dir=spec.output_dir,
        project=settings.project,
        location=settings.location,
        credentials=credentials,
        labels={"vlmtune": "training"},
        staging_bucket=spec.output_dir,
    )
    job.submit(service_account=settings.service_account or None, network=settings.network or None)
    print(f"submitted Vertex AI CustomJob {job.resource_name} ({spec.nodes} nodes x {spec.gpus_per_node} "
          f"{settings.accelerator_type or 'processes'}): {job._dashboard_uri()}", flush=True)
    return VertexJob(job)
