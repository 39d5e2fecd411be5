"""The fanned-out data preparation (``prepare_parallelism`` > 0): plan -> ParallelFor -> finalize in the compiled
spec of both targets, the part task retried, and the Vertex spec still loads into ``aiplatform.PipelineJob``."""
from __future__ import annotations

import yaml
import pytest

from pipelines.compile import compile_pipeline, target_settings


@pytest.fixture(scope="module")
def fanout_specs(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("fanout-specs")
    specs = {}
    for target in ("vertex", "kubeflow"):
        settings = target_settings(target, overrides={"prepare_parallelism": 4, "prepare_part_retries": 3})
        path = compile_pipeline(target, tmp / f"{target}.yaml", settings)
        specs[target] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return specs


@pytest.mark.parametrize("target", ["vertex", "kubeflow"])
def test_spec_shows_plan_parallel_for_and_finalize(fanout_specs, target):
    spec = fanout_specs[target][0]
    root = spec["root"]["dag"]["tasks"]
    loops = {name: t for name, t in root.items() if "iteratorPolicy" in t or "parameterIterator" in t}
    assert set(loops) == {"for-loop-2", "for-loop-4"} or len(loops) == 2, sorted(root)
    for name, loop in loops.items():
        assert loop["iteratorPolicy"]["parallelismLimit"] == 4
        assert loop["parameterIterator"]["items"]["inputParameter"].startswith("pipelinechannel--prepare-data-plan")
        inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
        (part,) = inner.values()
        assert part["componentRef"]["name"].startswith("comp-prepare-data-part")
        assert part["retryPolicy"]["maxRetryCount"] == 3
    finalizers = [t for t in root.values() if t["componentRef"]["name"].startswith("comp-prepare-data-finalize")]
    assert len(finalizers) == 2
    for f in finalizers:
        assert "parts" in f["inputs"]["artifacts"]  # the Collected parts of its loop
    assert spec["root"]["inputDefinitions"]["parameters"]["prepare_shards"]["parameterType"] == "NUMBER_INTEGER"
    assert not any(t["componentRef"]["name"] == "comp-prepare-data" for t in root.values())


def test_fanned_out_vertex_spec_loads_into_pipeline_job_offline(fanout_specs, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform

    path = tmp_path / "vertex.yaml"
    path.write_text(yaml.safe_dump(fanout_specs["vertex"][0]))
    params = {"sft_source": "gs://b/data/sft", "preference_source": "gs://b/data/pref", "base_model": "gs://b/models/base",
              "registry": "gs://b/registry", "prepare_shards": 8}
    job = aiplatform.PipelineJob(display_name="fanout", template_path=str(path), pipeline_root="gs://b/root",
                                 parameter_values=params, project="my-project", location="us-central1",
                                 credentials=AnonymousCredentials())
    assert job._gca_resource.runtime_config.parameter_values["prepare_shards"] == 8
