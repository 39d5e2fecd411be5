"""Kubeflow Pipelines: one run, and recurring runs, through ``kfp.Client`` against the cluster's KFP API.

``vlmtune submit`` and ``vlmtune schedule`` (pipelines/submit.py, pipelines/schedule.py) build the options and
parameters. A bearer token comes from ``$KFP_TOKEN``, never from a flag, and is never printed.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines.params import is_local
from pipelines.waiting import POLL_SECONDS, RunFailed, stream_state

KFP_SUCCESS = "SUCCEEDED"
KFP_TERMINAL = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED"}


@dataclass
class KubeflowOptions:
    host: str | None
    namespace: str | None = None
    experiment: str = "vlmtune"
    pipeline_root: str | None = None
    service_account: str | None = None
    enable_caching: bool | None = None
    existing_token: str | None = None  # never printed; from $KFP_TOKEN, not a flag

    @classmethod
    def from_environment(cls, host: str | None, namespace: str | None, **options) -> "KubeflowOptions":
        """Options with the host defaulting to ``$KF_PIPELINES_ENDPOINT`` and the token taken from ``$KFP_TOKEN``."""
        return cls(host=host or os.environ.get("KF_PIPELINES_ENDPOINT"), namespace=namespace,
                   existing_token=os.environ.get("KFP_TOKEN") or None, **options)

    def problems(self) -> list[str]:
        out = []
        if not self.host:
            out.append("--host: required for Kubeflow (e.g. http://localhost:8080 after "
                       "`kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`), or set KF_PIPELINES_ENDPOINT")
        if self.pipeline_root and is_local(self.pipeline_root):
            out.append(f"--pipeline-root: {self.pipeline_root!r} is a local path; use gs:// (or minio:// / s3://)")
        return out

    def client(self):
        import kfp

        # kfp.Client calls the API's /healthz in its constructor unless it is given a namespace; passing one
        # (default "kubeflow") spares that call.
        return kfp.Client(host=self.host, namespace=self.namespace or "kubeflow", existing_token=self.existing_token)


def submit_kubeflow(template: Path, params: dict, run_name: str, options: KubeflowOptions, *, wait: bool = False,
                    poll_s: float = POLL_SECONDS, client=None, out=None):
    out = out or sys.stdout
    client = client or options.client()
    result = client.create_run_from_pipeline_package(
        str(template), arguments=params, run_name=run_name, experiment_name=options.experiment,
        namespace=options.namespace, pipeline_root=options.pipeline_root, enable_caching=options.enable_caching,
        service_account=options.service_account,
    )
    print(f"submitted Kubeflow run {result.run_id} ({run_name}) in experiment {options.experiment!r}", file=out)
    if wait:
        state = stream_state(lambda: str(client.get_run(result.run_id).state), KFP_TERMINAL, poll_s=poll_s, out=out)
        if state != KFP_SUCCESS:
            raise RunFailed(f"Kubeflow run {result.run_id} ended {state}")
    return result


# ------------------------------------------------------------------------------------------- recurring runs

def create_kubeflow(template, params: dict, name: str, cron: str, options: KubeflowOptions, *, client=None,
                    max_concurrency: int = 1, start_time: str | None = None, end_time: str | None = None):
    """Create a recurring run of ``template`` with ``params`` on ``cron`` (6 fields, seconds first)."""
    client = client or options.client()
    experiment = client.create_experiment(name=options.experiment, namespace=options.namespace)
    # no_catchup: after a pause, one run for the missed interval, not one per missed night.
    return client.create_recurring_run(
        experiment_id=experiment.experiment_id, job_name=name, cron_expression=cron, max_concurrency=max_concurrency,
        no_catchup=True, params=params, pipeline_package_path=str(template), pipeline_root=options.pipeline_root,
        enable_caching=options.enable_caching, service_account=options.service_account, start_time=start_time,
        end_time=end_time,
    )


def list_kubeflow(client, namespace: str | None) -> list[dict]:
    """The namespace's recurring runs as rows: id, name, state, cron, next_run (empty: KFP does not say)."""
    response = client.list_recurring_runs(page_size=100, namespace=namespace)
    rows = []
    for r in response.recurring_runs or []:
        cron = r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else ""
        rows.append({"id": r.recurring_run_id, "name": r.display_name, "state": str(r.status or r.mode), "cron": cron,
                     "next_run": ""})
    return rows
