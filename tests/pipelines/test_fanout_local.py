"""A real kfp.local run of the fanned-out data preparation (plan -> ParallelFor -> Collected -> finalize, the
components the pipeline uses) writes the dataset of the one-container component, byte for byte."""
# no `from __future__ import annotations`: kfp reads the pipelines' real annotations

import json
from pathlib import Path

from kfp import dsl, local

from components.prepare_data.component import prepare_data, prepare_data_finalize, prepare_data_part, prepare_data_plan
from tests.components.prepare_data.test_fanout import make_source


def _ops():
    return {fn.__name__: dsl.component(fn, base_image="python:3.11", install_kfp_package=False)
            for fn in (prepare_data, prepare_data_plan, prepare_data_part, prepare_data_finalize)}


def test_kfp_local_parallel_for_equals_the_single_component(tmp_path):
    ops = _ops()
    config = {"num_workers": 0, "progress": False, "rows_per_shard": 7, "row_group_rows": 3, "max_invalid_fraction": 0.5}
    source = str(make_source(tmp_path / "src"))

    @dsl.pipeline(name="fanout-check")
    def fanned(source: str, shards: int) -> dsl.Dataset:
        plan = ops["prepare_data_plan"](source=source, task="sft", processor="", config=config, shards=shards)
        with dsl.ParallelFor(plan.outputs["Output"], parallelism=2) as item:
            part = ops["prepare_data_part"](plan=plan.outputs["plan"], item=item)
            part.set_retry(num_retries=1)
        return ops["prepare_data_finalize"](plan=plan.outputs["plan"], parts=dsl.Collected(part.outputs["part"]),
                                            task="sft").outputs["dataset"]

    @dsl.pipeline(name="single-check")
    def single(source: str) -> dsl.Dataset:
        return ops["prepare_data"](source=source, task="sft", processor="", config=config).outputs["dataset"]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"), raise_on_error=True)
    out3 = Path(fanned(source=source, shards=3).output.path)
    out1 = Path(single(source=source).output.path)
    m3, m1 = (json.loads((o / "manifest.json").read_text()) for o in (out3, out1))
    assert m3["items"] == 3 and m1["items"] == 1
    assert m3["content_hash"] == m1["content_hash"] and m3["counts"] == m1["counts"] and m3["rejects"] == m1["rejects"]
    for rel in [*m1["splits"]["train"]["files"], *m1["splits"]["eval"]["files"], "rejects.jsonl"]:
        assert (out3 / rel).read_bytes() == (out1 / rel).read_bytes(), rel
