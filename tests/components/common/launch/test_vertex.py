"""Vertex AI launcher: the real ``google-cloud-aiplatform`` CustomJob runs; only the GAPIC ``JobServiceClient``
methods (the last layer before gRPC) are replaced by an in-memory job service that records every request and plays
back a list of job states."""
from __future__ import annotations

import os
import signal

import pytest

pytest.importorskip("google.cloud.aiplatform")

from google.auth.credentials import AnonymousCredentials  # noqa: E402
from google.cloud.aiplatform_v1.services.job_service import JobServiceClient  # noqa: E402
from google.cloud.aiplatform_v1.types import custom_job as gca_custom_job  # noqa: E402
from google.cloud.aiplatform_v1.types import job_state as gca_job_state  # noqa: E402
from google.rpc import status_pb2  # noqa: E402

from components.common.launch import LaunchedJobFailed, LaunchError, LaunchSettings, job_spec, launch_training  # noqa: E402
from components.common.launch import vertex  # noqa: E402
from components.common.launch.common import SECRET_ENV, wait_for_job  # noqa: E402

S = gca_job_state.JobState
PARENT = "projects/p1/locations/europe-west4"
IMAGE = "europe-docker.pkg.dev/p1/vlmtune/vlmtune-cuda:0.1.0"


class FakeJobService:
    def __init__(self, states, error: str = ""):
        self.states = list(states)
        self.error = error
        self.created: list[gca_custom_job.CustomJob] = []
        self.cancelled: list[str] = []
        self.job = None

    def create_custom_job(self, parent, custom_job, timeout=None, **kw):
        assert parent == PARENT
        self.created.append(gca_custom_job.CustomJob(custom_job))
        self.job = gca_custom_job.CustomJob(custom_job)
        self.job.name = f"{PARENT}/customJobs/123"
        self.job.state = S.JOB_STATE_PENDING
        return gca_custom_job.CustomJob(self.job)

    def get_custom_job(self, name, **kw):
        assert name == self.job.name
        if self.states:
            self.job.state = self.states.pop(0)
        if self.job.state in (S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED):
            self.job.error = status_pb2.Status(code=13, message=self.error)
        return gca_custom_job.CustomJob(self.job)

    def cancel_custom_job(self, name, **kw):
        self.cancelled.append(name)


@pytest.fixture
def service(monkeypatch):
    fake = FakeJobService([S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED])
    for method in ("create_custom_job", "get_custom_job", "cancel_custom_job"):
        monkeypatch.setattr(JobServiceClient, method, lambda self, *a, _m=method, **kw: getattr(fake, _m)(*a, **kw))
    return fake


def settings(**kw) -> LaunchSettings:
    values = dict(launcher="vertex", image=IMAGE, project="p1", location="europe-west4",
                  service_account="vlmtune-pipeline@p1.iam.gserviceaccount.com", machine_type="g2-standard-96",
                  accelerator_type="NVIDIA_L4", hub_token_secret_version="projects/p1/secrets/hf-token/versions/latest",
                  poll_seconds=0.001, env={"NCCL_DEBUG": "WARN"})
    values.update(kw)
    return LaunchSettings(**values)


def spec(nodes=3, gpus=8, s=None):
    return job_spec("sft", {}, nodes, gpus, inputs=[("--dataset", "gs://b/run/data")], output_uri="gs://b/run/sft/model",
                    checkpoint_uri="gs://b/ckpt/sft", settings=s or settings(),
                    config_uri="gs://b/run/sft/model.launch/config.yaml")


def submit_and_wait(service, s=None, **kw):
    job = vertex.submit(spec(s=s, **kw), s or settings(), credentials=AnonymousCredentials())
    wait_for_job(job, poll_seconds=0.001, echo=lambda line: None, sleep=lambda s: None)
    return service.created[0]


def test_the_custom_job_has_a_chief_and_nodes_minus_one_workers_on_identical_machines(service):
    request = submit_and_wait(service)
    chief, workers = request.job_spec.worker_pool_specs
    assert [chief.replica_count, workers.replica_count] == [1, 2]
    for pool in (chief, workers):
        assert pool.machine_spec.machine_type == "g2-standard-96"
        assert pool.machine_spec.accelerator_type.name == "NVIDIA_L4"
        assert pool.machine_spec.accelerator_count == 8
        assert pool.container_spec.image_uri == IMAGE
        assert list(pool.container_spec.command) == [
            "python", "-m", "components.common.launch.node", "--nproc-per-node", "8", "--",
            "-m", "components.sft.cli", "--dataset", "gs://b/run/data", "--output", "gs://b/run/sft/model",
            "--config", "gs://b/run/sft/model.launch/config.yaml", "--checkpoint-uri", "gs://b/ckpt/sft"]
        env = {e.name: e.value for e in pool.container_spec.env}
        # The token's Secret Manager name travels, never a value; plain env from the settings is passed on.
        assert env == {"NCCL_DEBUG": "WARN", SECRET_ENV: "HF_TOKEN=projects/p1/secrets/hf-token/versions/latest"}
    assert request.job_spec.service_account == "vlmtune-pipeline@p1.iam.gserviceaccount.com"
    assert request.job_spec.base_output_directory.output_uri_prefix == "gs://b/run/sft/model.launch"
    assert request.display_name.startswith("vlmtune-sft-")


def test_one_node_is_the_chief_alone_and_cpu_machines_ask_for_no_accelerator(service):
    request = submit_and_wait(service, s=settings(accelerator_type="", hub_token_secret_version="", env={}), nodes=1, gpus=2)
    (chief,) = request.job_spec.worker_pool_specs
    assert chief.replica_count == 1
    assert chief.machine_spec.accelerator_count == 0
    assert chief.machine_spec.accelerator_type.name == "ACCELERATOR_TYPE_UNSPECIFIED"
    assert list(chief.container_spec.env) == []


def test_a_failed_job_fails_the_step_with_the_jobs_own_message(service):
    service.states = [S.JOB_STATE_RUNNING, S.JOB_STATE_RUNNING, S.JOB_STATE_FAILED]
    service.error = "The replica workerpool1-0 exited with a non-zero status of 1. torch.distributed.DistNetworkError"
    job = vertex.submit(spec(), settings(), credentials=AnonymousCredentials())
    with pytest.raises(LaunchedJobFailed, match=r"failed: The replica workerpool1-0 exited .*DistNetworkError"):
        wait_for_job(job, poll_seconds=0, echo=lambda line: None, sleep=lambda s: None)
    assert service.cancelled == []


def test_the_step_cancelled_by_sigterm_cancels_the_job(service):
    service.states = [S.JOB_STATE_RUNNING] * 1000
    job = vertex.submit(spec(), settings(), credentials=AnonymousCredentials())
    seen = []

    def sleep(_):
        seen.append(1)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what KFP's pod deletion sends the step

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        wait_for_job(job, poll_seconds=0, echo=lambda line: None, sleep=sleep)
    assert service.cancelled == [f"{PARENT}/customJobs/123"]
    assert signal.getsignal(signal.SIGTERM) is before  # the step's own handler is back


def test_launch_training_writes_the_config_submits_and_returns_the_published_manifest(tmp_path, monkeypatch):
    """The whole launch path with a local "bucket": config file beside the output, job handed the spec, manifest read."""
    from components.common import artifacts, storage
    from components.common.schema import MODEL_KIND

    out = tmp_path / "model"
    calls = []

    class Done:
        name = "job-1"

        def poll(self):
            out.mkdir()
            artifacts.write_manifest(str(out), {"kind": MODEL_KIND, "content_hash": "h", "metrics": {"loss": 0.5}})
            return "succeeded", None

        def cancel(self):
            raise AssertionError("not cancelled")

        def new_log_lines(self):
            return iter(())

    monkeypatch.setattr("components.common.launch.launch_problems", lambda *a: [])  # a local path stands in for gs://
    manifest = launch_training("sft", {"base_model": "m", "nodes": 2}, 2, 4, inputs=[("--dataset", "/d")],
                               output_uri=str(out), checkpoint_uri=None, settings=settings(poll_seconds=0.001),
                               submitters={"vertex": lambda spec, s: calls.append(spec) or Done()})
    assert manifest["content_hash"] == "h" and manifest["metrics"] == {"loss": 0.5}
    (sent,) = calls
    assert (sent.nodes, sent.gpus_per_node, sent.image) == (2, 4, IMAGE)
    assert "--checkpoint-uri" not in sent.command
    assert storage.read_text(f"{out}.launch/config.yaml") == "base_model: m\nnodes: 2\n"


def test_a_job_that_succeeds_without_publishing_fails_the_step(tmp_path, monkeypatch):
    class Done:
        name = "job-2"

        def poll(self):
            return "succeeded", None

        def cancel(self):
            pass

        def new_log_lines(self):
            return iter(())

    monkeypatch.setattr("components.common.launch.launch_problems", lambda *a: [])
    with pytest.raises(LaunchedJobFailed, match="job-2 succeeded but .* is not a published model"):
        launch_training("sft", {}, 2, 1, inputs=[], output_uri=str(tmp_path / "m"), checkpoint_uri=None,
                        settings=settings(poll_seconds=0.001), submitters={"vertex": lambda spec, s: Done()})


def test_nothing_is_written_or_submitted_when_the_launch_cannot_work(tmp_path):
    def never(*a, **kw):
        raise AssertionError("submitted")

    with pytest.raises(LaunchError) as e:
        launch_training("dpo", {}, 2, 1, inputs=[("--dataset", str(tmp_path / "d"))], output_uri="gs://b/m",
                        checkpoint_uri="", settings=settings(project="", machine_type=""), submitters={"vertex": never})
    text = str(e.value)
    assert "project: required" in text and "machine_type: required" in text
    assert f"--dataset is '{tmp_path / 'd'}'" in text and "needs gs://" in text
    with pytest.raises(LaunchError, match=r"dpo_config.nodes=2 needs a multi-node launcher.*set dpo_config.nodes=1"):
        launch_training("dpo", {}, 2, 1, inputs=[], output_uri="gs://b/m", checkpoint_uri="",
                        settings=LaunchSettings(), submitters={"vertex": never})
    with pytest.raises(LaunchError, match="env.HF_TOKEN: secrets do not go into job env values"):
        launch_training("sft", {}, 2, 1, inputs=[], output_uri="gs://b/m", checkpoint_uri="",
                        settings=settings(env={"HF_TOKEN": "hf_x"}), submitters={"vertex": never})
