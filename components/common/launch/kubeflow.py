"""Kubeflow launcher: one Kubeflow Trainer ``TrainJob`` on a torch-distributed runtime, created with the
``kubeflow`` SDK's ``TrainerClient`` (``CustomTrainerContainer``: the project image, ``numNodes``, resources per
node incl. ``nvidia.com/gpu``, env; the command through the SDK's ``TrainerCommand`` option).

The runtime sets ``PET_NNODES``/``PET_NODE_RANK``/``PET_MASTER_ADDR``/``PET_MASTER_PORT`` on every node and torchrun
reads them. The SDK's trainer env takes plain values only, so the hub token comes in through a ``RuntimePatch``
of the ``node`` container: ``env[].valueFrom.secretKeyRef`` names the Kubernetes Secret and key, never the value.
"""
from __future__ import annotations

from typing import Iterator

from components.common.launch.common import LaunchSettings, LaunchSpec

NODE = "node"  # the torch-distributed runtime's replicated job and container name
STATE_NAMES = {"Complete": "succeeded", "Failed": "failed"}


def trainer_and_options(spec: LaunchSpec, settings: LaunchSettings):
    """(CustomTrainerContainer, options) the SDK's ``TrainerClient.train`` turns into the TrainJob."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options.common import Name
    from kubeflow.trainer.options.kubernetes import (ContainerPatch, JobSetSpecPatch, JobSetTemplatePatch,
                                                     JobSpecPatch, JobTemplatePatch, Labels, PodSpecPatch,
                                                     PodTemplatePatch, ReplicatedJobPatch, RuntimePatch,
                                                     TrainerCommand, TrainingRuntimeSpecPatch)

    # accelerator_type is the Kubernetes resource name (nvidia.com/gpu); empty means CPU nodes, one process per CPU slot.
    # A string: the SDK's quantity model turns an int into a float (4 -> 4.0), and extended resources want integers.
    resources = {settings.accelerator_type: str(spec.gpus_per_node)} if settings.accelerator_type else {}
    if settings.cpu:
        resources["cpu"] = settings.cpu
    if settings.memory:
        resources["memory"] = settings.memory
    trainer = CustomTrainerContainer(image=spec.image, num_nodes=spec.nodes, resources_per_node=resources or None,
                                     env=dict(spec.env) or None)
    options = [Name(spec.name), TrainerCommand(list(spec.command)), Labels({"app.kubernetes.io/part-of": "vlmtune"})]
    pod = PodSpecPatch(service_account_name=settings.service_account or None)
    if settings.hub_token_secret:
        secret = {"secretKeyRef": {"name": settings.hub_token_secret, "key": settings.hub_token_key, "optional": True}}
        pod.containers = [ContainerPatch(name=NODE, env=[{"name": "HF_TOKEN", "valueFrom": secret}])]
    if pod.containers or pod.service_account_name:
        options.append(RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(template=JobSetTemplatePatch(
            spec=JobSetSpecPatch(replicated_jobs=[ReplicatedJobPatch(name=NODE, template=JobTemplatePatch(
                spec=JobSpecPatch(template=PodTemplatePatch(spec=pod))))])))))
    return trainer, options


class KubeflowJob:
    """A created TrainJob, seen through the shape :func:`common.wait_for_job` polls."""

    def __init__(self, client, name: str):
        self.client = client
        self.name = name
        self._lines_shown = 0

    def poll(self) -> tuple[str, str | None]:
        status = self.client.get_job(self.name).status
        state = STATE_NAMES.get(status, "running")
        return state, (self.failure_message() if state == "failed" else None)

    def failure_message(self) -> str | None:
        """The TrainJob's own reason: its Failed condition (the SDK's TrainJob type keeps only the status)."""
        from kubeflow.trainer.constants import constants
        from kubeflow_trainer_api import models

        backend = self.client.backend
        raw = backend.custom_api.get_namespaced_custom_object(constants.GROUP, constants.VERSION, backend.namespace,
                                                              constants.TRAINJOB_PLURAL, self.name)
        job = models.TrainerV1alpha1TrainJob.from_dict(raw)
        for c in (job.status.conditions if job.status and job.status.conditions else []):
            if c.type == constants.TRAINJOB_FAILED and c.status == "True":
                return f"{c.reason}: {c.message}" if c.reason else c.message
        return None

    def cancel(self) -> None:
        self.client.delete_job(self.name)

    def new_log_lines(self) -> Iterator[str]:
        """Lines of node 0's log not shown yet (global rank 0 logs the training)."""
        lines = list(self.client.get_job_logs(self.name, follow=False, step=f"{NODE}-0"))
        new, self._lines_shown = lines[self._lines_shown:], max(self._lines_shown, len(lines))
        return iter(new)


def submit(spec: LaunchSpec, settings: LaunchSettings, *, client_configuration=None) -> KubeflowJob:
    """Create the TrainJob through ``TrainerClient.train`` and return its handle. In a pipeline pod the SDK uses the
    in-cluster config and the pod's namespace unless ``settings.namespace`` names another."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    client = TrainerClient(backend_config=KubernetesBackendConfig(namespace=settings.namespace or None,
                                                                  client_configuration=client_configuration))
    trainer, options = trainer_and_options(spec, settings)
    name = client.train(runtime=settings.runtime, trainer=trainer, options=options)
    print(f"created Kubeflow TrainJob {client.backend.namespace}/{name} on runtime {settings.runtime} "
          f"({spec.nodes} nodes x {spec.gpus_per_node} GPUs)", flush=True)
    return KubeflowJob(client, name)
