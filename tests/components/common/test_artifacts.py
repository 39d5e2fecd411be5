"""A refused artifact folder is refused for the reason that is true (components/common/artifacts.py): it does not
exist, it exists but is not a vlmtune artifact (with the command that makes one), or a step began writing it and
did not finish.

Run: pytest tests/components/common/test_artifacts.py -q
"""
from __future__ import annotations

import pytest

from components.common import artifacts
from components.common.schema import DATASET_KIND, EVAL_KIND, MODEL_KIND


def refused(uri, kind=None) -> artifacts.IncompleteArtifactError:
    with pytest.raises(artifacts.IncompleteArtifactError) as info:
        artifacts.read_manifest(str(uri), kind=kind)
    return info.value


def test_a_missing_folder_does_not_exist(tmp_path):
    error = refused(tmp_path / "nope", MODEL_KIND)
    assert isinstance(error, artifacts.ArtifactNotFoundError)
    assert str(error).startswith(f"'{tmp_path / 'nope'}' does not exist; expected a vlmtune model (the output folder "
                                 f"of `vlmtune sft` or `vlmtune dpo`)")
    assert "has no manifest" not in str(error)


def test_a_source_folder_is_not_a_dataset_and_the_message_says_run_prepare_data(tmp_path):
    source = tmp_path / "photos"
    (source / "images").mkdir(parents=True)
    (source / "rows.jsonl").write_text("{}\n")
    error = refused(source, DATASET_KIND)
    assert isinstance(error, artifacts.NotAnArtifactError)
    assert str(error) == (f"'{source}' exists but is not a vlmtune dataset: it has no manifest.json (it holds images/, "
                          f"rows.jsonl); if it is source data, run prepare-data on it first: `vlmtune prepare-data "
                          f"--source {source} --output DIR` (add --task preference for chosen/rejected rows), then pass DIR")
    (tmp_path / "empty").mkdir()
    assert "is an empty folder, not a vlmtune evaluation" in str(refused(tmp_path / "empty", EVAL_KIND))
    (tmp_path / "file.json").write_text("{}")
    assert "is a file; expected a vlmtune dataset folder" in str(refused(tmp_path / "file.json", DATASET_KIND))


def test_an_artifact_s_files_without_a_manifest_are_an_unfinished_step(tmp_path):
    half = tmp_path / "model"
    (half / "adapter").mkdir(parents=True)
    (half / "adapter" / "adapter_model.safetensors").write_bytes(b"w")
    error = refused(half, MODEL_KIND)
    assert isinstance(error, artifacts.UnfinishedArtifactError)
    assert "holds parts of a vlmtune model (adapter/) but no manifest.json: the step that wrote it did not finish" in str(error)


def test_a_folder_being_written_by_local_output_is_named_as_such(tmp_path):
    (tmp_path / ".data.partial-abc123").mkdir()
    error = refused(tmp_path / "data", DATASET_KIND)
    assert isinstance(error, artifacts.UnfinishedArtifactError)
    assert "a step is writing it now, or was killed while writing it (found '.data.partial-abc123'" in str(error)


def test_the_wrong_kind_names_both_kinds(tmp_path):
    (tmp_path / "d").mkdir()
    artifacts.write_manifest(str(tmp_path / "d"), {"kind": DATASET_KIND})
    error = refused(tmp_path / "d", MODEL_KIND)
    assert "holds a 'vlmtune.dataset' artifact, but a 'vlmtune.model' artifact was expected" in str(error)
    assert "the output folder of `vlmtune sft` or `vlmtune dpo`" in str(error)
    assert artifacts.read_manifest(str(tmp_path / "d"), kind=DATASET_KIND)["kind"] == DATASET_KIND
