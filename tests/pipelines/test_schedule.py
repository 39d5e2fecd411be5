"""`vlmtune schedule`: cron translation and validation, the requests Vertex AI and Kubeflow receive, and what a
scheduled run trains on (pipelines/snapshots.py: newest snapshot, skip when the data is the champion's)."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from tests.pipelines.test_submit import PARAMS, VERTEX_ARGS, _main, kfp_fake, params_file, templates, vertex_fake  # noqa: F401

# ------------------------------------------------------------------------------------------- cron


@pytest.mark.parametrize("expr,vertex,kubeflow", [
    ("0 3 * * *", "0 3 * * *", "0 0 3 * * *"),
    ("*/15  9-17 * * MON-FRI", "*/15 9-17 * * MON-FRI", "0 */15 9-17 * * MON-FRI"),
    ("30 2 1,15 JAN,jul 0", "30 2 1,15 JAN,jul 0", "0 30 2 1,15 JAN,jul 0"),
])
def test_cron_translation(expr, vertex, kubeflow):
    from pipelines.schedule import kubeflow_cron, vertex_cron

    assert vertex_cron(expr) == vertex
    assert vertex_cron(expr, "Europe/Paris") == f"TZ=Europe/Paris {vertex}"
    assert kubeflow_cron(expr) == kubeflow
    assert kubeflow_cron(expr, "UTC") == kubeflow


@pytest.mark.parametrize("expr,message", [
    ("0 3 * *", "has 4 fields; expected 5"),
    ("60 3 * * *", "field 1 (minute): 60 is outside 0-59"),
    ("0 24 * * *", "field 2 (hour): 24 is outside 0-23"),
    ("0 3 0 * *", "field 3 (day-of-month): 0 is outside 1-31"),
    ("0 3 * 13 *", "field 4 (month): 13 is outside 1-12"),
    ("0 3 * * FUNDAY", "field 5 (day-of-week): 'FUNDAY' is not a number"),
    ("*/0 3 * * *", "step '0'"),
    ("@daily", "macros"),
    ("TZ=UTC 0 3 * * *", "--time-zone"),
    ("0 3 ? * *", "no '?'"),
])
def test_vertex_cron_errors(expr, message):
    from pipelines.schedule import CronError, vertex_cron

    with pytest.raises(CronError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?").replace("*", r"\*")):
        vertex_cron(expr)


def test_kubeflow_cron_six_fields_and_time_zones():
    from pipelines.schedule import CronError, kubeflow_cron, vertex_cron

    assert kubeflow_cron("15 0 3 ? * *") == "15 0 3 ? * *"
    with pytest.raises(CronError, match=r"field 1 \(second\): 61"):
        kubeflow_cron("61 0 3 * * *")
    with pytest.raises(CronError, match="scheduler's time zone"):
        kubeflow_cron("0 3 * * *", "Europe/Paris")
    with pytest.raises(CronError, match="not an IANA time zone"):
        vertex_cron("0 3 * * *", "Mars/Olympus")
    with pytest.raises(CronError, match="expected 5"):
        vertex_cron("0 0 3 * * *")


# ------------------------------------------------------------------------------------------- Vertex AI

def test_vertex_schedule_lifecycle(vertex_fake, params_file, templates, capsys):
    rc = _main(["schedule", "create", *VERTEX_ARGS, "--template", templates["vertex"], "--params", params_file,
                "--set", "sft_source=gs://acme/exports/{date}/sft", "--name", "nightly", "--cron", "0 3 * * *",
                "--time-zone", "Europe/Paris", "--service-account", "runner@my-project.iam.gserviceaccount.com",
                "--network", "projects/123/global/networks/ml-vpc", "--label", "team=vision", "--max-runs", "30"])
    assert rc == 0, capsys.readouterr().err
    (name, schedule), = vertex_fake.schedules.items()
    assert name == "projects/my-project/locations/us-central1/schedules/1000"
    assert schedule.display_name == "nightly"
    assert schedule.cron == "TZ=Europe/Paris 0 3 * * *"
    assert schedule.max_concurrent_run_count == 1 and schedule.max_run_count == 30
    request = schedule.create_pipeline_job_request
    assert request.parent == "projects/my-project/locations/us-central1"
    job = request.pipeline_job
    assert job.service_account == "runner@my-project.iam.gserviceaccount.com"
    assert job.network == "projects/123/global/networks/ml-vpc"
    assert dict(job.labels) == {"team": "vision"}
    assert job.runtime_config.gcs_output_directory == "gs://acme/pipeline-root"
    values = job.runtime_config.parameter_values
    assert values["sft_source"] == "gs://acme/exports/{date}/sft"  # resolved by each run, not now
    assert "sft_checkpoint_uri" not in values  # a fixed one would make every run resume the last
    assert job.pipeline_spec["pipelineInfo"]["name"] == "vlmtune"
    assert "created Vertex AI schedule" in capsys.readouterr().out

    base = ["--target", "vertex", "--project", "my-project", "--region", "us-central1"]
    assert _main(["schedule", "list", *base]) == 0
    listing = capsys.readouterr().out
    assert "1000" in listing and "nightly" in listing and "TZ=Europe/Paris 0 3 * * *" in listing and "ACTIVE" in listing
    assert _main(["schedule", "pause", *base, "1000"]) == 0
    assert vertex_fake.schedules[name].state.name == "PAUSED"
    assert _main(["schedule", "resume", *base, "1000"]) == 0
    assert _main(["schedule", "delete", *base, "1000"]) == 0
    assert vertex_fake.schedule_calls == [("pause", name), ("resume", name), ("delete", name)]
    assert vertex_fake.schedules == {}


def test_schedule_refuses_fixed_checkpoints_and_bad_cron(vertex_fake, params_file, templates, capsys):
    args = ["schedule", "create", *VERTEX_ARGS, "--template", templates["vertex"], "--params", params_file, "--name", "n"]
    assert _main([*args, "--cron", "0 3 * * *", "--set", "sft_checkpoint_uri=gs://acme/ckpt"]) == 2
    assert "resume the previous one" in capsys.readouterr().err
    assert _main([*args, "--cron", "0 25 * * *"]) == 2
    assert "hour" in capsys.readouterr().err
    assert vertex_fake.schedules == {}


# ------------------------------------------------------------------------------------------- Kubeflow

def test_kubeflow_recurring_run_lifecycle(kfp_fake, params_file, templates, capsys):
    conn = ["--target", "kubeflow", "--host", kfp_fake.url, "--namespace", "team-vision"]
    rc = _main(["schedule", "create", *conn, "--template", templates["kubeflow"], "--params", params_file,
                "--name", "nightly", "--cron", "0 3 * * *", "--pipeline-root", "gs://acme/kfp-root",
                "--experiment", "retrain", "--service-account", "pipeline-runner"])
    assert rc == 0, capsys.readouterr().err
    (experiment,) = kfp_fake.bodies("POST", "/experiments")
    assert experiment["display_name"] == "retrain" and experiment["namespace"] == "team-vision"
    (rec,) = kfp_fake.bodies("POST", "/recurringruns")
    assert rec["display_name"] == "nightly" and rec["experiment_id"] == "exp-1"
    assert rec["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"  # seconds first
    assert rec["mode"] == "ENABLE" and str(rec["max_concurrency"]) == "1" and rec["no_catchup"] is True
    assert rec["service_account"] == "pipeline-runner"
    assert rec["runtime_config"]["pipeline_root"] == "gs://acme/kfp-root"
    assert rec["runtime_config"]["parameters"]["registry"] == PARAMS["registry"]
    assert "sft_checkpoint_uri" not in rec["runtime_config"]["parameters"]
    assert "platform_spec" in rec["pipeline_spec"]

    assert _main(["schedule", "list", *conn]) == 0
    assert "rec-1" in capsys.readouterr().out
    assert _main(["schedule", "pause", *conn, "rec-1"]) == 0
    assert kfp_fake.recurring["rec-1"]["status"] == "DISABLED"
    assert _main(["schedule", "resume", *conn, "rec-1"]) == 0
    assert kfp_fake.recurring["rec-1"]["status"] == "ENABLED"
    assert _main(["schedule", "delete", *conn, "rec-1"]) == 0
    assert kfp_fake.recurring == {}
    paths = [(r["method"], r["path"]) for r in kfp_fake.requests]
    assert ("POST", "/apis/v2beta1/recurringruns/rec-1:disable") in paths
    assert ("POST", "/apis/v2beta1/recurringruns/rec-1:enable") in paths
    assert ("DELETE", "/apis/v2beta1/recurringruns/rec-1") in paths


# ------------------------------------------------------------------------------------------- snapshots

def _touch(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_date_placeholder_picks_the_newest_complete_day(tmp_path):
    from components.common.snapshots import SnapshotError, resolve_snapshot

    today = dt.date(2026, 11, 29)
    _touch(tmp_path / "exports" / "2026-11-20" / "sft" / "rows.jsonl")
    _touch(tmp_path / "exports" / "2026-11-27" / "sft" / "rows.jsonl")
    _touch(tmp_path / "exports" / "2026-11-28" / "sft" / "rows.jsonl")  # being written: no marker yet
    _touch(tmp_path / "exports" / "2026-11-27" / "sft" / "_SUCCESS")
    _touch(tmp_path / "exports" / "2026-11-30" / "sft" / "rows.jsonl")  # the future: never
    uri = str(tmp_path / "exports" / "{date}" / "sft")
    assert resolve_snapshot(uri, today=today) == str(tmp_path / "exports" / "2026-11-28" / "sft")
    assert resolve_snapshot(uri, today=today, ready_marker="_SUCCESS") == str(tmp_path / "exports" / "2026-11-27" / "sft")
    with pytest.raises(SnapshotError, match="no snapshot holding '_SUCCESS'"):
        resolve_snapshot(uri, today=dt.date(2026, 11, 26), ready_marker="_SUCCESS", max_age_days=3)
    _touch(tmp_path / "dt=20261125" / "a")
    assert resolve_snapshot(str(tmp_path / "dt={date:%Y%m%d}"), today=today) == str(tmp_path / "dt=20261125")
    with pytest.raises(SnapshotError, match="time-of-day"):
        resolve_snapshot(str(tmp_path / "{date:%Y%m%d%H}"), today=today)
    assert resolve_snapshot(str(tmp_path / "fixed"), today=today) == str(tmp_path / "fixed")


def test_latest_pointer_absolute_and_relative(tmp_path):
    from components.common.snapshots import SnapshotError, resolve_snapshot

    _touch(tmp_path / "LATEST", "snapshots/2026-11-28\n")
    assert resolve_snapshot(str(tmp_path / "LATEST")) == str(tmp_path / "snapshots" / "2026-11-28")
    _touch(tmp_path / "b" / "latest.txt", "\n  gs://acme/exports/7  \n")
    assert resolve_snapshot(str(tmp_path / "b" / "latest.txt")) == "gs://acme/exports/7"
    with pytest.raises(SnapshotError, match="does not exist"):
        resolve_snapshot(str(tmp_path / "c" / "LATEST"))
    _touch(tmp_path / "d" / "LATEST", "  \n")
    with pytest.raises(SnapshotError, match="is empty"):
        resolve_snapshot(str(tmp_path / "d" / "LATEST"))
    _touch(tmp_path / "e" / "LATEST", "half")
    with pytest.raises(SnapshotError, match="not complete"):
        resolve_snapshot(str(tmp_path / "e" / "LATEST"), ready_marker="_SUCCESS")


@pytest.mark.gcs
def test_snapshots_resolve_on_gs(gcs_bucket):
    from components.common import storage
    from components.common.snapshots import resolve_snapshot

    root = f"gs://{gcs_bucket}/exports"
    storage.write_text(f"{root}/2026-11-26/sft/rows.jsonl", "{}")
    storage.write_text(f"{root}/2026-11-28/sft/rows.jsonl", "{}")
    storage.write_text(f"{root}/LATEST", "2026-11-26/sft")
    assert resolve_snapshot(f"{root}/{{date}}/sft", today=dt.date(2026, 11, 29)) == f"{root}/2026-11-28/sft"
    assert resolve_snapshot(f"{root}/LATEST") == f"{root}/2026-11-26/sft"


def test_should_train():
    from components.common.snapshots import should_train

    manifest = {"content_hash": "abc123"}
    assert should_train(manifest, None) == (True, "no champion yet: train")
    train, reason = should_train(manifest, {"dataset_hash": "abc123", "dataset_uri": "gs://b/d"})
    assert train is False and "equals the champion's" in reason and "gs://b/d" in reason
    train, reason = should_train(manifest, {"dataset_hash": "zzz"})
    assert train is True and "differs" in reason
    assert should_train({}, {"dataset_hash": "abc123"})[0] is True
    assert should_train(manifest, {"base_model": "m"})[0] is True


def test_champion_lineage_from_a_local_registry(tmp_path):
    from components.common.registry import open_registry
    from components.common.snapshots import champion_lineage

    registry = str(tmp_path / "registry")
    assert champion_lineage(registry, "tiny") is None
    reg = open_registry(registry)
    (tmp_path / "model").mkdir()  # the registry copies what it registers
    (tmp_path / "model" / "adapter_model.safetensors").write_bytes(b"w")
    version = reg.register("tiny", str(tmp_path / "model"), content_hash="m1", metrics={"exact_match": 1.0},
                           lineage={"dataset_hash": "abc123"}, card="# tiny")
    reg.set_alias("tiny", "champion", version.version)
    assert champion_lineage(registry, "tiny")["dataset_hash"] == "abc123"
    json.dumps(champion_lineage(registry, "tiny"))
