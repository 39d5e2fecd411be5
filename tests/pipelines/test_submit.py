"""`vlmtune submit`: parameters validated before anything is sent, and the requests the real clients send.

The clients run for real up to the network boundary:
- Vertex AI: ``aiplatform.PipelineJob`` builds and sends its request; only the gapic ``PipelineServiceClient``'s
  ``create_pipeline_job``/``get_pipeline_job`` are replaced (by :class:`VertexFake`), so the test sees the exact
  ``PipelineJob`` proto that would go over the wire. (Also stubbed: the SDK's own "create the pipeline-root
  bucket" courtesy call, and application default credentials.)
- Kubeflow: ``kfp.Client`` talks HTTP to :class:`KfpFake`, a loopback server implementing the v2beta1 REST paths
  it uses; the test reads the JSON bodies it received.
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

PARAMS = {
    "sft_source": "gs://acme/exports/2026-11-28/sft",
    "preference_source": "gs://acme/exports/2026-11-28/pref",
    "base_model": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "registry": "gs://acme/registry",
    "registry_name": "chart-vlm",
    "sft_config": {"learning_rate": 0.0001, "num_train_epochs": 1},
}


# ------------------------------------------------------------------------------------------- fakes

class VertexFake:
    """Stands in for the Vertex AI API behind the gapic clients; records requests."""

    def __init__(self):
        self.created_jobs = []  # (parent, job_id, PipelineJob proto)
        self.states = ["PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING", "PIPELINE_STATE_SUCCEEDED"]
        self.schedules = {}  # name -> Schedule proto
        self.schedule_calls = []  # (method, name)
        self.bucket_checks = []

    def create_pipeline_job(self, parent=None, pipeline_job=None, pipeline_job_id=None, **_):
        job = type(pipeline_job).deserialize(type(pipeline_job).serialize(pipeline_job))
        job.name = f"{parent}/pipelineJobs/{pipeline_job_id}"
        job.state = "PIPELINE_STATE_PENDING"
        self.created_jobs.append((parent, pipeline_job_id, job))
        return job

    def get_pipeline_job(self, name=None, **_):
        job = next(j for _, _, j in self.created_jobs if j.name == name)
        job = type(job).deserialize(type(job).serialize(job))
        job.state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return job

    def create_schedule(self, parent=None, schedule=None, **_):
        created = type(schedule).deserialize(type(schedule).serialize(schedule))
        created.name = f"{parent}/schedules/{1000 + len(self.schedules)}"
        created.state = "ACTIVE"
        self.schedules[created.name] = created
        return created

    def get_schedule(self, name=None, **_):
        return self.schedules[name]

    def list_schedules(self, request=None, **_):
        return list(self.schedules.values())

    def _change(self, method, state=None):
        def call(*args, name=None, **kwargs):
            self.schedule_calls.append((method, name))
            if state:
                self.schedules[name].state = state
            if method == "delete":
                del self.schedules[name]

                class Done:  # the long-running operation delete returns, already finished
                    operation = type("Operation", (), {"name": f"{name}/operations/1"})()

                    def result(self, timeout=None):
                        return None
                return Done()
        return call


@pytest.fixture
def vertex_fake(monkeypatch):
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.aiplatform.utils import gcs_utils
    from google.cloud.aiplatform_v1.services.pipeline_service import PipelineServiceClient
    from google.cloud.aiplatform_v1.services.schedule_service import ScheduleServiceClient

    fake = VertexFake()
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), "my-project"))
    monkeypatch.setattr(gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist",
                        lambda **kw: fake.bucket_checks.append(kw["output_artifacts_gcs_dir"]))
    monkeypatch.setattr(PipelineServiceClient, "create_pipeline_job", fake.create_pipeline_job)
    monkeypatch.setattr(PipelineServiceClient, "get_pipeline_job", fake.get_pipeline_job)
    monkeypatch.setattr(ScheduleServiceClient, "create_schedule", fake.create_schedule)
    monkeypatch.setattr(ScheduleServiceClient, "get_schedule", fake.get_schedule)
    monkeypatch.setattr(ScheduleServiceClient, "list_schedules", fake.list_schedules)
    monkeypatch.setattr(ScheduleServiceClient, "pause_schedule", fake._change("pause", "PAUSED"))
    monkeypatch.setattr(ScheduleServiceClient, "resume_schedule", fake._change("resume", "ACTIVE"))
    monkeypatch.setattr(ScheduleServiceClient, "delete_schedule", fake._change("delete"))
    return fake


class KfpFake:
    """A loopback HTTP server speaking the KFP v2beta1 REST API paths kfp.Client uses; records every request."""

    def __init__(self):
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.run_states = ["PENDING", "RUNNING", "SUCCEEDED"]
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append({"method": method, "path": url.path, "query": parse_qs(url.query), "body": body,
                                      "headers": {k.lower(): v for k, v in self.headers.items()}})
                status, reply = fake.route(method, url.path, parse_qs(url.query), body)
                self._reply(status, reply)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_DELETE(self):
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def route(self, method, path, query, body):
        p = "/apis/v2beta1"
        if path == f"{p}/experiments" and method == "GET":
            wanted = json.loads(query["filter"][0])["predicates"][0]["stringValue"] if "filter" in query else None
            found = [e for e in self.experiments.values() if wanted in (None, e["display_name"])]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if path == f"{p}/experiments" and method == "POST":
            exp = {**body, "experiment_id": f"exp-{len(self.experiments) + 1}"}
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if path == f"{p}/runs" and method == "POST":
            run = {**body, "run_id": f"run-{len(self.runs) + 1}", "state": "PENDING"}
            self.runs[run["run_id"]] = run
            return 200, run
        m = re.fullmatch(rf"{p}/runs/([^/:]+)", path)
        if m and method == "GET":
            state = self.run_states.pop(0) if len(self.run_states) > 1 else self.run_states[0]
            return 200, {**self.runs[m.group(1)], "state": state}
        if path == f"{p}/recurringruns" and method == "POST":
            rec = {**body, "recurring_run_id": f"rec-{len(self.recurring) + 1}", "status": "ENABLED"}
            self.recurring[rec["recurring_run_id"]] = rec
            return 200, rec
        if path == f"{p}/recurringruns" and method == "GET":
            return 200, {"recurringRuns": list(self.recurring.values()), "total_size": len(self.recurring)}
        m = re.fullmatch(rf"{p}/recurringruns/([^/:]+)(?::(enable|disable))?", path)
        if m and m.group(1) in self.recurring:
            if method == "DELETE":
                del self.recurring[m.group(1)]
                return 200, {}
            if m.group(2):
                self.recurring[m.group(1)]["status"] = "ENABLED" if m.group(2) == "enable" else "DISABLED"
                return 200, {}
            return 200, self.recurring[m.group(1)]
        return 404, {"error": f"fake: no route for {method} {path}", "code": 5}

    def bodies(self, method: str, path_suffix: str) -> list[dict]:
        return [r["body"] for r in self.requests if r["method"] == method and r["path"].endswith(path_suffix)]


@pytest.fixture
def kfp_fake():
    fake = KfpFake()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(PARAMS))
    return path


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    from pipelines.compile import compile_pipeline

    tmp = tmp_path_factory.mktemp("templates")
    return {t: compile_pipeline(t, tmp / f"{t}.yaml") for t in ("vertex", "kubeflow")}


def _main(argv):
    from pipelines.cli import main

    return main([str(a) for a in argv])


VERTEX_ARGS = ["--target", "vertex", "--project", "my-project", "--region", "us-central1",
               "--pipeline-root", "gs://acme/pipeline-root"]


# ------------------------------------------------------------------------------------------- Vertex AI

def test_vertex_submit_sends_the_whole_job(vertex_fake, params_file, templates, capsys):
    rc = _main(["submit", *VERTEX_ARGS, "--template", templates["vertex"], "--params", params_file,
                "--set", "sft_config.learning_rate=2e-4", "--set", "registry_name=chart-vlm-2",
                "--service-account", "runner@my-project.iam.gserviceaccount.com",
                "--network", "projects/123/global/networks/ml-vpc", "--label", "team=vision", "--label", "cost-center=r-d",
                "--no-cache", "--run-name", "nightly-1"])
    assert rc == 0, capsys.readouterr().err
    (parent, job_id, job), = vertex_fake.created_jobs
    assert parent == "projects/my-project/locations/us-central1"
    assert job_id == "nightly-1" and job.display_name == "nightly-1"
    assert job.service_account == "runner@my-project.iam.gserviceaccount.com"
    assert job.network == "projects/123/global/networks/ml-vpc"
    assert dict(job.labels) == {"team": "vision", "cost-center": "r-d"}
    assert job.runtime_config.gcs_output_directory == "gs://acme/pipeline-root"
    values = job.runtime_config.parameter_values
    assert values["sft_source"] == PARAMS["sft_source"] and values["registry"] == "gs://acme/registry"
    assert values["registry_name"] == "chart-vlm-2"
    assert dict(values["sft_config"]) == {"learning_rate": 0.0002, "num_train_epochs": 1}
    assert values["sft_checkpoint_uri"] == "gs://acme/pipeline-root/checkpoints/nightly-1/sft"
    assert values["dpo_checkpoint_uri"] == "gs://acme/pipeline-root/checkpoints/nightly-1/dpo"
    # The template itself travels in the request: the compiled spec, with --no-cache applied to every task.
    spec = job.pipeline_spec
    assert spec["pipelineInfo"]["name"] == "vlmtune"
    assert all(t["cachingOptions"].get("enableCache", False) is False for t in spec["root"]["dag"]["tasks"].values())
    assert vertex_fake.bucket_checks == ["gs://acme/pipeline-root"]
    assert "projects/my-project/locations/us-central1/pipelineJobs/nightly-1" in capsys.readouterr().out


def test_vertex_submit_compiles_for_the_target_when_no_template(vertex_fake, params_file):
    assert _main(["submit", *VERTEX_ARGS, "--params", params_file, "--image-tag", "7.7.7", "--run-name", "r7"]) == 0
    (_, _, job), = vertex_fake.created_jobs
    images = {e["container"]["image"] for e in job.pipeline_spec["deploymentSpec"]["executors"].values()}
    assert images == {"us-central1-docker.pkg.dev/YOUR_PROJECT/vlmtune/vlmtune-cuda:7.7.7",
                      "us-central1-docker.pkg.dev/YOUR_PROJECT/vlmtune/vlmtune-cpu:7.7.7"}
    assert "platforms" not in job.pipeline_spec


def test_vertex_submit_wait_streams_states_and_exit_code(vertex_fake, params_file, templates, capsys):
    rc = _main(["submit", *VERTEX_ARGS, "--template", templates["vertex"], "--params", params_file, "--run-name", "w1",
                "--wait", "--poll-seconds", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert [line.split("state: ")[1] for line in out.splitlines() if "state: " in line] == [
        "PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING", "PIPELINE_STATE_SUCCEEDED"]
    vertex_fake.states = ["PIPELINE_STATE_RUNNING", "PIPELINE_STATE_FAILED"]
    rc = _main(["submit", *VERTEX_ARGS, "--template", templates["vertex"], "--params", params_file, "--run-name", "w2",
                "--wait", "--poll-seconds", "0"])
    assert rc == 1
    assert "ended PIPELINE_STATE_FAILED" in capsys.readouterr().err


def test_vertex_submit_associates_the_experiment(vertex_fake, params_file, templates, monkeypatch):
    from google.cloud import aiplatform

    seen = []
    monkeypatch.setattr(aiplatform.PipelineJob, "_validate_experiment", lambda self, e: seen.append(("validate", e)))
    monkeypatch.setattr(aiplatform.PipelineJob, "_associate_to_experiment", lambda self, e: seen.append(("associate", e)))
    assert _main(["submit", *VERTEX_ARGS, "--template", templates["vertex"], "--params", params_file,
                  "--experiment", "vlmtune-nightly", "--run-name", "e1"]) == 0
    assert seen == [("validate", "vlmtune-nightly"), ("associate", "vlmtune-nightly")]


def test_vertex_rejects_local_uris_and_reports_all_problems(vertex_fake, params_file, templates, capsys):
    rc = _main(["submit", "--target", "vertex", "--project", "my-project", "--region", "us-central1",
                "--pipeline-root", "/tmp/root", "--template", templates["vertex"], "--params", params_file,
                "--set", "sft_source=./data/sft", "--set", "registry=/srv/registry", "--set", "learning_rate=1",
                "--set", "sft_config.lora_rr=8", "--label", "Team=Vision"])
    err = capsys.readouterr().err
    assert rc == 2
    for expected in ("--pipeline-root: '/tmp/root' must be a gs:// URI", "--label 'Team=Vision'",
                     "--set: unknown parameter 'learning_rate'", "--set: sft_source: './data/sft' must be a gs:// URI on Vertex AI",
                     "--set: registry: '/srv/registry' is on this machine",
                     "--set: sft_config: unknown key 'lora_rr' (did you mean 'lora_r'?)"):
        assert expected in err, (expected, err)
    assert vertex_fake.created_jobs == []


def test_missing_required_parameters_are_named(vertex_fake, templates, capsys):
    rc = _main(["submit", *VERTEX_ARGS, "--template", templates["vertex"], "--set", "base_model=org/model"])
    err = capsys.readouterr().err
    assert rc == 2
    for name in ("sft_source", "preference_source", "registry"):
        assert f"{name}: required" in err
    assert "base_model: required" not in err


def test_secrets_are_refused_as_parameters(vertex_fake, params_file, templates, capsys):
    rc = _main(["submit", *VERTEX_ARGS, "--template", templates["vertex"], "--params", params_file,
                "--set", "sft_config.hf_token=hf_abcdef"])
    err = capsys.readouterr().err
    assert rc == 2 and "--set: sft_config.hf_token: looks like a secret" in err
    assert "hf_abcdef" not in err
    assert vertex_fake.created_jobs == []


def test_vertex_refuses_a_kubeflow_template(vertex_fake, params_file, templates, capsys):
    rc = _main(["submit", *VERTEX_ARGS, "--template", templates["kubeflow"], "--params", params_file])
    assert rc == 2 and "single-document" in capsys.readouterr().err


def test_params_and_sets_merge_and_checkpoints_default():
    from pipelines.params import load_params, with_checkpoints

    params = load_params(None, ["base_model=org/m", "sft_config.max_steps=10", "sft_config.method=lora",
                                "eval_config.min_delta=0.01"])
    assert params == {"base_model": "org/m", "sft_config": {"max_steps": 10, "method": "lora"}, "eval_config": {"min_delta": 0.01}}
    kept = with_checkpoints({"sft_checkpoint_uri": "gs://x/mine"}, "gs://r/", "run-1")
    assert kept == {"sft_checkpoint_uri": "gs://x/mine", "dpo_checkpoint_uri": "gs://r/checkpoints/run-1/dpo"}
    assert with_checkpoints({}, "minio://mlpipeline/v2", "run-1") == {}


def test_run_and_submit_share_one_set_merge():
    from pipelines.params import SubmitError, merge_overrides

    base = {"base_model": "org/m", "sft_config": {"max_steps": 5, "method": "lora"}}
    assert merge_overrides(base, ["sft_config.max_steps=10", "registry_name=x"]) == {
        "base_model": "org/m", "sft_config": {"max_steps": 10, "method": "lora"}, "registry_name": "x"}
    assert base["sft_config"]["max_steps"] == 5  # the caller's mapping is left alone
    with pytest.raises(SubmitError, match="unknown pipeline parameter 'registry_nam'; known: base_model, sft_config"):
        merge_overrides(base, ["registry_nam=x"], only_known=True)  # `vlmtune run` starts from every parameter
    with pytest.raises(SubmitError, match="base_model is not a config section"):
        merge_overrides(base, ["base_model.revision=main"])


# ------------------------------------------------------------------------------------------- Kubeflow

def test_kubeflow_submit_creates_experiment_and_run(kfp_fake, params_file, templates, monkeypatch, capsys):
    monkeypatch.setenv("KFP_TOKEN", "sekrit-bearer")
    rc = _main(["submit", "--target", "kubeflow", "--host", kfp_fake.url, "--namespace", "team-vision",
                "--template", templates["kubeflow"], "--params", params_file, "--experiment", "vlmtune-exp",
                "--pipeline-root", "gs://acme/kfp-root", "--service-account", "pipeline-runner", "--run-name", "k1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (experiment,) = kfp_fake.bodies("POST", "/experiments")
    assert experiment["display_name"] == "vlmtune-exp" and experiment["namespace"] == "team-vision"
    (run,) = kfp_fake.bodies("POST", "/runs")
    assert run["experiment_id"] == "exp-1" and run["display_name"] == "k1"
    assert run["service_account"] == "pipeline-runner"
    runtime = run["runtime_config"]
    assert runtime["pipeline_root"] == "gs://acme/kfp-root"
    assert runtime["parameters"]["sft_source"] == PARAMS["sft_source"]
    assert runtime["parameters"]["sft_config"] == PARAMS["sft_config"]
    assert runtime["parameters"]["sft_checkpoint_uri"] == "gs://acme/kfp-root/checkpoints/k1/sft"
    # The compiled spec travels with its kfp-kubernetes platform spec (GPU node selector, tolerations, secret).
    platform = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert platform["exec-sft"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert platform["exec-sft"]["secretAsEnv"][0]["secretName"] == "vlmtune-hub-token"
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "vlmtune"
    # The token goes in a header only, never in a body or the output.
    assert all(r["headers"].get("authorization") == "Bearer sekrit-bearer" for r in kfp_fake.requests)
    assert "sekrit" not in json.dumps([r["body"] for r in kfp_fake.requests]) + out + err
    assert "run-1" in out


def test_kubeflow_submit_reuses_the_experiment_and_waits(kfp_fake, params_file, templates, capsys):
    args = ["submit", "--target", "kubeflow", "--host", kfp_fake.url, "--namespace", "ns", "--template",
            templates["kubeflow"], "--params", params_file, "--pipeline-root", "gs://acme/kfp-root"]
    assert _main([*args, "--run-name", "a"]) == 0
    assert _main([*args, "--run-name", "b", "--wait", "--poll-seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert len(kfp_fake.bodies("POST", "/experiments")) == 1  # found by name the second time
    assert [r["experiment_id"] for r in kfp_fake.bodies("POST", "/runs")] == ["exp-1", "exp-1"]
    assert [line.split("state: ")[1] for line in out.splitlines() if "state: " in line] == ["PENDING", "RUNNING", "SUCCEEDED"]


def test_kubeflow_rejects_vertex_flags_and_local_sources(kfp_fake, params_file, templates, capsys):
    rc = _main(["submit", "--target", "kubeflow", "--host", kfp_fake.url, "--template", templates["kubeflow"],
                "--params", params_file, "--project", "p", "--set", "preference_source=/data/pref"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--project: Vertex AI options" in err
    assert "preference_source: '/data/pref' is a local path" in err
    assert kfp_fake.requests == []
