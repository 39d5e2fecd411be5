"""The demo's README table is written from the runs' summaries (pipelines/demo.py --write-readme), never typed,
and `vlmtune run` checks everything before it builds the demo inputs.

Run: pytest tests/pipelines/test_demo.py -q
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.demo import README_END, README_START, demo_for_readme, readme_block, resolve_run_params, write_readme

REPO = Path(__file__).resolve().parents[2]


def summary(wall: float, **extra) -> dict:
    return {"base_accuracy": 0.0, "sft_accuracy": 0.479, "dpo_accuracy": 0.4962, "passed": True, "registered_version": 1,
            "wall_seconds": wall, "metric": "exact_match", "eval_rows": 119,
            "per_category": {"base": {"colour": 0.0}, "sft": {"colour": 0.54, "count": 0.25}}, **extra}


def test_the_table_comes_from_the_summaries_and_replaces_only_the_marked_block(tmp_path):
    block = readme_block(summary(181.23), summary(1.4), date="2026-12-03", machine="a 2-core machine")
    assert block.splitlines()[0] == README_START and block.splitlines()[-1] == README_END
    assert "| first run | 0.000 | 0.479 | 0.496 | passed | v1 | 181.2 s (tiny model and data built, all steps run) |" in block
    assert "| second run | 0.000 | 0.479 | 0.496 | passed | v1 (same) | 1.4 s (every step from kfp's cache) |" in block
    assert "Measured 2026-12-03 on a 2-core machine" in block and "exact_match on the 119 held-out rows" in block
    assert "Per question type: base colour 0.00; sft colour 0.54, count 0.25." in block
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{README_START}\nold table 0.487\n{README_END}\nafter\n")
    write_readme(readme, block)
    assert readme.read_text() == f"# title\n\nbefore\n{block}\nafter\n"


def test_the_project_readme_has_the_markers():
    text = (REPO / "README.md").read_text()
    assert text.count(README_START) == 1 and text.count(README_END) == 1
    assert text.index(README_START) < text.index(README_END)


def test_write_readme_wants_a_fresh_workdir_and_markers(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="measures a first run: --workdir .* is not empty"):
        demo_for_readme(tmp_path / "used", REPO / "README.md")
    (tmp_path / "plain.md").write_text("# no markers\n")
    with pytest.raises(ValueError, match="no demo markers"):
        demo_for_readme(tmp_path / "new", tmp_path / "plain.md")
    assert not (tmp_path / "new").exists()


def test_run_params_are_checked_before_the_demo_inputs_exist(tmp_path):
    params, to_build = resolve_run_params(tmp_path / "work", sets=["sft_config.learning_rate=1e-3"])
    assert to_build == ("base_model", "sft_source", "preference_source")
    assert params["base_model"] == str(tmp_path / "work" / "tiny-model")
    assert params["sft_config"]["learning_rate"] == 1e-3 and params["sft_config"]["num_train_epochs"] == 10
    assert params["registry_name"] == "demo-shapes"
    assert not (tmp_path / "work").exists()
    data = tmp_path / "mine"
    data.mkdir()
    params, to_build = resolve_run_params(tmp_path / "work", sets=[f"sft_source={data}", "base_model=org/model"])
    assert to_build == ("preference_source",) and params["sft_source"] == str(data)


def test_training_figures_show_the_eval_loss_when_it_was_logged(tmp_path):
    import json

    from pipelines.demo import step_figures

    def model_with(metrics):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"kind": "vlmtune.model", "metrics": metrics}))
        return {"model": str(folder)}

    base = {"global_steps": 40, "train_rows": 480, "first_logged_loss": 6.3, "last_logged_loss": 0.51}
    assert step_figures("sft", model_with({**base, "first_eval_loss": None, "last_eval_loss": None})) == \
        "40 steps on 480 rows, loss 6.3 -> 0.51"
    assert step_figures("sft", model_with({**base, "first_eval_loss": 5.9, "last_eval_loss": 0.62})) == \
        "40 steps on 480 rows, loss 6.3 -> 0.51, eval loss 5.9 -> 0.62"
