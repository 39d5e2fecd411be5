"""Vertex AI Pipelines: one pipeline job, and schedules (PipelineJobSchedule) of it.

The calls go through ``google.cloud.aiplatform``, imported only when one is made. ``vlmtune submit`` and
``vlmtune schedule`` (pipelines/submit.py, pipelines/schedule.py) build the options and parameters.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.params import SubmitError
from pipelines.waiting import POLL_SECONDS, RunFailed, stream_state

VERTEX_RUN_NAME = re.compile(r"^[a-z][a-z0-9-]{0,127}$")
VERTEX_SUCCESS = "PIPELINE_STATE_SUCCEEDED"
VERTEX_TERMINAL = {"PIPELINE_STATE_SUCCEEDED", "PIPELINE_STATE_FAILED", "PIPELINE_STATE_CANCELLED"}


@dataclass
class VertexOptions:
    project: str
    region: str
    pipeline_root: str
    service_account: str | None = None
    network: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    experiment: str | None = None
    enable_caching: bool | None = None
    credentials: Any = None  # google.auth credentials; None: application default credentials

    def problems(self) -> list[str]:
        out = []
        if not self.project:
            out.append("--project: required for Vertex AI")
        if not self.region:
            out.append("--region: required for Vertex AI (e.g. us-central1)")
        if not (self.pipeline_root or "").startswith("gs://"):
            out.append(f"--pipeline-root: {self.pipeline_root!r} must be a gs:// URI on Vertex AI")
        if self.service_account and "@" not in self.service_account:
            out.append(f"--service-account: {self.service_account!r} is not an email (NAME@PROJECT.iam.gserviceaccount.com)")
        if self.network and not re.match(r"^projects/[^/]+/global/networks/[^/]+$", self.network):
            out.append(f"--network: {self.network!r} must look like projects/PROJECT_NUMBER/global/networks/NAME")
        return out


def vertex_job(template: Path, params: dict, run_name: str, options: VertexOptions, *, job_id: str | None = None):
    """An unsubmitted ``aiplatform.PipelineJob`` (aiplatform checks the parameters against the spec offline)."""
    from google.cloud import aiplatform

    return aiplatform.PipelineJob(
        display_name=run_name, template_path=str(template), job_id=job_id, pipeline_root=options.pipeline_root,
        parameter_values=params, enable_caching=options.enable_caching, labels=options.labels or None,
        project=options.project, location=options.region, credentials=options.credentials,
    )


def submit_vertex(template: Path, params: dict, run_name: str, options: VertexOptions, *, wait: bool = False,
                  poll_s: float = POLL_SECONDS, out=None):
    if not VERTEX_RUN_NAME.match(run_name):
        raise SubmitError(f"--run-name {run_name!r}: Vertex job ids are lowercase letters, digits and '-', starting with a letter")
    out = out or sys.stdout
    job = vertex_job(template, params, run_name, options, job_id=run_name)
    job.submit(service_account=options.service_account, network=options.network, experiment=options.experiment)
    print(f"submitted Vertex AI pipeline job {job.resource_name}", file=out)
    if wait:
        state = stream_state(lambda: job.state.name, VERTEX_TERMINAL, poll_s=poll_s, out=out)
        if state != VERTEX_SUCCESS:
            raise RunFailed(f"pipeline job {job.resource_name} ended {state}")
    return job


# ------------------------------------------------------------------------------------------- schedules

def create_vertex(template, params: dict, name: str, cron: str, options: VertexOptions, *, max_run_count=None,
                  max_concurrent_run_count: int = 1, start_time: str | None = None, end_time: str | None = None):
    """Create a PipelineJobSchedule that starts a job from ``template`` with ``params`` on ``cron``."""
    from google.cloud import aiplatform

    job = vertex_job(template, params, name, options)
    schedule = aiplatform.PipelineJobSchedule(pipeline_job=job, display_name=name, credentials=options.credentials,
                                              project=options.project, location=options.region)
    schedule.create(cron=cron, max_run_count=max_run_count, max_concurrent_run_count=max_concurrent_run_count,
                    start_time=start_time, end_time=end_time, service_account=options.service_account,
                    network=options.network)
    return schedule


def vertex_schedule(schedule_id: str, project: str, region: str, credentials=None):
    """An existing schedule, by its number or full resource name (to pause, resume or delete it)."""
    from google.cloud import aiplatform

    return aiplatform.PipelineJobSchedule.get(schedule_id, project=project, location=region, credentials=credentials)


def list_vertex(project: str, region: str, credentials=None) -> list[dict]:
    """The region's schedules as rows: id, name, state, cron, next_run."""
    from google.cloud import aiplatform

    rows = []
    for s in aiplatform.PipelineJobSchedule.list(project=project, location=region, credentials=credentials):
        res = s.gca_resource
        rows.append({"id": s.resource_name.rsplit("/", 1)[-1], "name": res.display_name, "state": res.state.name,
                     "cron": res.cron, "next_run": str(res.next_run_time) if res.next_run_time else ""})
    return rows
