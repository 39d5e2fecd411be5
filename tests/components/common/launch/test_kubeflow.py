"""Kubeflow launcher: the real ``kubeflow`` SDK (TrainerClient, KubernetesBackend) runs; only the ``kubernetes``
client's ``CustomObjectsApi``/``CoreV1Api`` methods (the last layer before HTTP) are replaced by an in-memory
cluster holding this repository's TrainingRuntime (infra/kubeflow/base/trainingruntime.yaml)."""
from __future__ import annotations

import datetime
import os
import signal
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kubeflow.trainer")

from kubernetes import client as k8s  # noqa: E402
from kubeflow.trainer.constants import constants  # noqa: E402
from kubeflow_trainer_api import models  # noqa: E402

from components.common.launch import LaunchedJobFailed, LaunchSettings, job_spec  # noqa: E402
from components.common.launch import kubeflow  # noqa: E402
from components.common.launch.common import wait_for_job  # noqa: E402

NS = "team-ml"
IMAGE = "ghcr.io/acme/vlmtune/vlmtune-cuda:0.1.0"
RUNTIME_YAML = Path(__file__).resolve().parents[4] / "infra/kubeflow/base/trainingruntime.yaml"


class Thread:
    """What ``async_req=True`` returns in the kubernetes client: a handle whose ``get`` gives the result."""

    def __init__(self, value):
        self.value = value

    def get(self, timeout=None):
        return self.value


class FakeCluster:
    def __init__(self):
        runtime = yaml.safe_load(RUNTIME_YAML.read_text())
        runtime["metadata"]["namespace"] = NS
        self.objects = {("trainingruntimes", runtime["metadata"]["name"]): runtime}
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.conditions: list[dict] = []
        self.pod_phase = "Running"
        self.log = ""

    # CustomObjectsApi
    def get_namespaced_custom_object(self, group, version, namespace, plural, name, async_req=False, **kw):
        assert (group, version, namespace) == (constants.GROUP, constants.VERSION, NS)
        if (plural, name) not in self.objects:
            raise k8s.ApiException(status=404)
        obj = dict(self.objects[(plural, name)])
        if plural == "trainjobs" and self.conditions:
            obj["status"] = {"conditions": self.conditions}
        return Thread(obj) if async_req else obj

    def get_cluster_custom_object(self, *a, **kw):
        raise k8s.ApiException(status=404)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):
        assert (plural, namespace) == ("trainjobs", NS)
        self.created.append(body)
        stored = {**body, "metadata": {**body["metadata"], "namespace": NS,
                                       "creationTimestamp": "2026-12-03T17:00:00Z"}}
        self.objects[("trainjobs", body["metadata"]["name"])] = stored
        return stored

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        assert (plural, namespace) == ("trainjobs", NS)
        self.deleted.append(name)

    # CoreV1Api
    def read_namespaced_config_map(self, name, namespace, **kw):
        return k8s.V1ConfigMap(data={"kubeflow_trainer_version": "2.3.0"})

    def list_namespaced_pod(self, namespace, label_selector=None, async_req=False, **kw):
        name = next(iter(n for p, n in self.objects if p == "trainjobs"))
        pods = [k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name=f"{name}-node-0-{i}-x", labels={constants.JOBSET_RJOB_NAME_LABEL: "node",
                                                                            constants.JOB_INDEX_LABEL: str(i)},
                                      creation_timestamp=datetime.datetime(2026, 12, 3, 17, tzinfo=datetime.timezone.utc)),
            spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="node")]),
            status=k8s.V1PodStatus(phase=self.pod_phase)) for i in range(2)]
        return Thread(k8s.V1PodList(items=pods))

    def read_namespaced_pod_log(self, name, namespace, container, **kw):
        assert container == "node" and "-node-0-0-" in name  # node 0: global rank 0 logs the training
        return self.log


@pytest.fixture
def cluster(monkeypatch):
    fake = FakeCluster()
    for api, methods in ((k8s.CustomObjectsApi, ("get_namespaced_custom_object", "get_cluster_custom_object",
                                                 "create_namespaced_custom_object", "delete_namespaced_custom_object")),
                         (k8s.CoreV1Api, ("read_namespaced_config_map", "list_namespaced_pod", "read_namespaced_pod_log"))):
        for method in methods:
            monkeypatch.setattr(api, method, lambda self, *a, _m=method, **kw: getattr(fake, _m)(*a, **kw))
    return fake


def settings(**kw) -> LaunchSettings:
    values = dict(launcher="kubeflow", image=IMAGE, namespace=NS, runtime="vlmtune-torch-distributed",
                  service_account="vlmtune-pipeline", hub_token_secret="vlmtune-hub-token", hub_token_key="HF_TOKEN",
                  accelerator_type="nvidia.com/gpu", cpu="8", memory="64G", poll_seconds=0.001,
                  env={"NCCL_DEBUG": "WARN"})
    values.update(kw)
    return LaunchSettings(**values)


def submit(nodes=2, gpus=4, s=None):
    s = s or settings()
    spec = job_spec("dpo", {}, nodes, gpus, inputs=[("--dataset", "gs://b/pref"), ("--sft-model", "gs://b/sft")],
                    output_uri="gs://b/dpo/model", checkpoint_uri="gs://b/ckpt/dpo", settings=s,
                    config_uri="gs://b/dpo/model.launch/config.yaml")
    return kubeflow.submit(spec, s, client_configuration=k8s.Configuration())


def test_the_trainjob_asks_the_runtime_for_nodes_gpus_image_command_env_and_the_secret_by_reference(cluster):
    job = submit(nodes=3, gpus=4)
    (body,) = cluster.created
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"]["name"] == job.name and job.name.startswith("vlmtune-dpo-")
    ref = body["spec"]["runtimeRef"]
    assert (ref["name"], ref["kind"]) == ("vlmtune-torch-distributed", "TrainingRuntime")
    trainjob = models.TrainerV1alpha1TrainJob.from_dict(body)  # the SDK's own model of what was sent
    trainer = trainjob.spec.trainer
    assert trainer.num_nodes == 3
    assert trainer.image == IMAGE
    per_node = body["spec"]["trainer"]["resourcesPerNode"]
    assert per_node["limits"] == per_node["requests"] == {"nvidia.com/gpu": "4", "cpu": "8", "memory": "64G"}
    assert trainer.command == [
        "python", "-m", "components.common.launch.node", "--nproc-per-node", "4", "--", "-m", "components.dpo.cli",
        "--dataset", "gs://b/pref", "--sft-model", "gs://b/sft", "--output", "gs://b/dpo/model",
        "--config", "gs://b/dpo/model.launch/config.yaml", "--checkpoint-uri", "gs://b/ckpt/dpo"]
    assert [(e.name, e.value) for e in trainer.env] == [("NCCL_DEBUG", "WARN")]
    # The hub token: the node container's env names the Secret and key; no value anywhere in the request.
    (patch,) = body["spec"]["runtimePatches"]
    assert patch["manager"] == "trainer.kubeflow.org/kubeflow-sdk"
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and pod["serviceAccountName"] == "vlmtune-pipeline"
    assert pod["containers"] == [{"name": "node", "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "vlmtune-hub-token", "key": "HF_TOKEN", "optional": True}}}]}]
    assert "hf_" not in str(body)


def test_without_a_secret_or_account_there_is_no_patch_and_cpu_nodes_ask_for_no_gpu(cluster):
    submit(s=settings(hub_token_secret="", service_account="", accelerator_type="", cpu="", memory="", env={}))
    (body,) = cluster.created
    assert "runtimePatches" not in body["spec"]
    assert "resourcesPerNode" not in body["spec"]["trainer"] and "env" not in body["spec"]["trainer"]


def test_the_job_is_followed_to_completion_with_node_zeros_log(cluster):
    job = submit()
    cluster.log = "step 1 loss 2.1\nstep 2 loss 1.7"
    shown = []
    states = iter([[], [], [{"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "done",
                             "lastTransitionTime": "2026-12-03T17:10:00Z"}]])

    def sleep(_):
        cluster.conditions = next(states)
        cluster.log += "\nstep 3 loss 1.2"

    wait_for_job(job, poll_seconds=0, echo=shown.append, sleep=sleep)
    # Every log line once, in order, however often the log was read.
    assert [line for line in shown if line.startswith("step")] == ["step 1 loss 2.1", "step 2 loss 1.7"] + \
        ["step 3 loss 1.2"] * 3
    assert shown[:3] == ["step 1 loss 2.1", "step 2 loss 1.7", f"job {job.name}: running"]
    assert shown[-1] == f"job {job.name}: succeeded"
    assert cluster.deleted == []


def test_a_failed_trainjob_fails_the_step_with_its_own_condition_message(cluster):
    job = submit()
    cluster.conditions = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                           "message": "jobset failed: node-1 exited 1: CUDA out of memory",
                           "lastTransitionTime": "2026-12-03T17:10:00Z"}]
    with pytest.raises(LaunchedJobFailed, match=r"failed: BackoffLimitExceeded: jobset failed: node-1 exited 1: CUDA out of memory"):
        wait_for_job(job, poll_seconds=0, echo=lambda line: None, sleep=lambda s: None)
    assert cluster.deleted == []


def test_cancelling_the_step_deletes_the_trainjob(cluster):
    job = submit()

    def sleep(_):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        wait_for_job(job, poll_seconds=0, echo=lambda line: None, sleep=sleep)
    assert cluster.deleted == [job.name]
