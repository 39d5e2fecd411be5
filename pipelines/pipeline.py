"""The vlmtune pipeline: prepare data -> SFT -> DPO -> evaluate -> [passed?] -> register.

Every step is a lightweight Python component whose container image comes from one place
(:func:`pipelines.images.image_for`), so on Vertex AI and Kubeflow each step runs in its own image and
under kfp.local the very same components run in-process. Per-step resources, retries and caching come from a
:class:`PipelineSettings`, applied when the pipeline is built (compile once per target).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional  # no `from __future__ import annotations`: kfp reads real annotations

from kfp import dsl
from kfp.dsl import Dataset, Input

from components.dpo.component import dpo
from components.evaluate.component import evaluate
from components.prepare_data.component import prepare_data, prepare_data_finalize, prepare_data_part, prepare_data_plan
from components.register.component import register
from components.sft.component import sft
from pipelines.images import default_registry_prefix, default_tag, image_for
from pipelines.steps import STEPS

PIPELINE_NAME = "vlmtune"
#: Steps that train on several nodes by launching a job when their config says nodes > 1.
LAUNCHING_STEPS = ("sft", "dpo")


@dataclass
class StepResources:
    cpu: Optional[str] = None  # e.g. "8"
    memory: Optional[str] = None  # e.g. "32G"
    accelerator_type: Optional[str] = None  # Vertex: "NVIDIA_L4"; Kubeflow: "nvidia.com/gpu"
    accelerator_count: int = 0
    retries: int = 0


@dataclass
class PipelineSettings:
    """Everything that varies between targets but not between runs: images, hardware, retries, caching."""

    # The same defaults `vlmtune images build` tags with, so a local docker run finds the images just built.
    registry_prefix: str = field(default_factory=default_registry_prefix)
    image_tag: str = field(default_factory=default_tag)
    gpu_images: bool = True
    caching: bool = True
    #: Scheduled retraining: stop after data preparation when the data equals the champion's training data.
    skip_unchanged_data: bool = False
    resources: dict[str, StepResources] = field(default_factory=dict)
    #: How sft/dpo launch a multi-node job (`nodes > 1`): the target's `launch:` settings
    #: (components.common.launch.LaunchSettings), handed to those steps as $VLMTUNE_LAUNCH; empty: launcher local.
    launch: dict[str, Any] = field(default_factory=dict)
    #: Fan out data preparation: 0 keeps one container per dataset (today's shape); N > 0 compiles
    #: plan -> dsl.ParallelFor(items, parallelism=N) of part -> finalize, and the pipeline gains the run
    #: parameter ``prepare_shards`` (work items; 1 gives the one-container dataset through the same code).
    #: A compile-time choice because KFP takes ParallelFor's parallelism only as a literal int.
    prepare_parallelism: int = 0
    #: Retries of each part task (an item reruns alone; a half-written part is never taken).
    prepare_part_retries: int = 2
    #: Called as task_hook(task, step) after the generic settings, for target-specific task config that has no
    #: place in the spec both targets share (pipelines.compile installs kfp-kubernetes node selectors,
    #: tolerations and secrets here for Kubeflow; Vertex leaves it None so its spec stays one document).
    task_hook: Optional[Callable[[Any, str], None]] = field(default=None, compare=False, repr=False)

    def image(self, step: str) -> str:
        return image_for(step, self.registry_prefix, self.image_tag, gpu=self.gpu_images)

    @classmethod
    def from_dict(cls, values: dict) -> "PipelineSettings":
        values = dict(values)
        resources = {k: StepResources(**v) for k, v in (values.pop("resources", None) or {}).items()}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown pipeline settings {sorted(unknown)}")
        unknown_steps = set(resources) - set(STEPS)
        if unknown_steps:
            raise ValueError(f"resources for unknown steps {sorted(unknown_steps)}; steps are {STEPS}")
        return cls(**values, resources=resources)


def data_changed_since_champion(dataset: Input[Dataset], registry: str, registry_name: str) -> bool:
    """True when the prepared data differs from what the registry's champion was trained on."""
    from components.common import artifacts
    from components.common.snapshots import champion_lineage, should_train

    train, reason = should_train(artifacts.read_manifest(dataset.path), champion_lineage(registry, registry_name))
    print(reason)
    return bool(train)


def build_components(settings: PipelineSettings) -> dict:
    """One KFP component per step, each bound to its image. install_kfp_package=False: the image has kfp."""
    functions = {"prepare_data": prepare_data, "sft": sft, "dpo": dpo, "evaluate": evaluate, "register": register}
    ops = {
        step: dsl.component(fn, base_image=settings.image(step), install_kfp_package=False)
        for step, fn in functions.items()
    }
    for name, fn in (("plan", prepare_data_plan), ("part", prepare_data_part), ("finalize", prepare_data_finalize)):
        ops[f"prepare_data_{name}"] = dsl.component(fn, base_image=settings.image("prepare_data"), install_kfp_package=False)
    return ops


def _configure(task, step: str, settings: PipelineSettings, display_name: str):
    task.set_display_name(display_name)
    task.set_caching_options(settings.caching)
    res = settings.resources.get(step)
    if res:
        if res.cpu:
            task.set_cpu_limit(res.cpu)
        if res.memory:
            task.set_memory_limit(res.memory)
        if res.accelerator_type and res.accelerator_count:
            task.set_accelerator_type(res.accelerator_type).set_accelerator_limit(res.accelerator_count)
        if res.retries:
            task.set_retry(num_retries=res.retries, backoff_duration="60s", backoff_factor=2.0)
    if settings.launch and step in LAUNCHING_STEPS:
        import json

        from components.common.launch import LAUNCH_ENV

        launch = {"accelerator_type": (res.accelerator_type if res else None) or "", **settings.launch,
                  "image": settings.image(step)}
        task.set_env_variable(LAUNCH_ENV, json.dumps(launch, sort_keys=True))
    if settings.task_hook:
        settings.task_hook(task, step)
    return task


def build_pipeline(settings: PipelineSettings | None = None):
    settings = settings or PipelineSettings()
    ops = build_components(settings)

    def train_evaluate_register(sft_data, pref_data, base_model, registry, registry_name, sft_config, dpo_config,
                                eval_config, sft_checkpoint_uri, dpo_checkpoint_uri):
        sft_task = _configure(ops["sft"](dataset=sft_data.outputs["dataset"], base_model=base_model, config=sft_config,
                                         checkpoint_uri=sft_checkpoint_uri), "sft", settings, "SFT")
        # The SFT data goes to DPO too: with dpo_config pairs_from_sft_mistakes its pairs are the SFT model's
        # wrong answers on the SFT train split (the preference data then gives the eval loss only).
        dpo_task = _configure(ops["dpo"](dataset=pref_data.outputs["dataset"], sft_model=sft_task.outputs["model"],
                                         sft_dataset=sft_data.outputs["dataset"], config=dpo_config,
                                         checkpoint_uri=dpo_checkpoint_uri), "dpo", settings, "DPO")
        eval_task = _configure(ops["evaluate"](dataset=sft_data.outputs["dataset"], preference_dataset=pref_data.outputs["dataset"],
                                               sft_model=sft_task.outputs["model"],
                                               dpo_model=dpo_task.outputs["model"], config=eval_config, registry=registry,
                                               registry_name=registry_name), "evaluate", settings, "evaluate")
        # Gate on evaluate's single bool return value. A float output compared with an int literal compiles to
        # `double(0)`, which kfp.local's condition evaluator does not know, and kfp.local cannot resolve a named
        # NamedTuple output: in both cases it skips both branches and still reports the run as succeeded.
        with dsl.If(eval_task.outputs["Output"] == True, name="passed-gate"):  # noqa: E712
            _configure(ops["register"](model=dpo_task.outputs["model"], evaluation=eval_task.outputs["evaluation"],
                                       dataset=sft_data.outputs["dataset"], registry=registry, name=registry_name),
                       "register", settings, "register")
        return eval_task, dpo_task

    def prepare_one(source, task, base_model, prepare_config, shards, what):
        if not settings.prepare_parallelism:
            return _configure(ops["prepare_data"](source=source, task=task, processor=base_model, config=prepare_config,
                                                  shards=shards),
                              "prepare_data", settings, f"prepare {what} data")
        plan = _configure(ops["prepare_data_plan"](source=source, task=task, processor=base_model, config=prepare_config,
                                                   shards=shards), "prepare_data", settings, f"plan {what} data")
        with dsl.ParallelFor(plan.outputs["Output"], parallelism=settings.prepare_parallelism, name=f"{task}-items") as item:
            part = _configure(ops["prepare_data_part"](plan=plan.outputs["plan"], item=item), "prepare_data", settings,
                              f"prepare {what} item")
            if settings.prepare_part_retries:
                part.set_retry(num_retries=settings.prepare_part_retries, backoff_duration="30s", backoff_factor=2.0)
        return _configure(ops["prepare_data_finalize"](plan=plan.outputs["plan"], parts=dsl.Collected(part.outputs["part"]),
                                                       task=task), "prepare_data", settings, f"finalize {what} data")

    def prepare(sft_source, preference_source, base_model, prepare_config, shards):
        sft_data = prepare_one(sft_source, "sft", base_model, prepare_config, shards, "SFT")
        pref_data = prepare_one(preference_source, "preference", base_model, prepare_config, shards, "preference")
        return sft_data, pref_data

    if settings.skip_unchanged_data:
        # The scheduled-retraining shape: stop after data preparation when the data is what the champion was
        # trained on. Its steps sit under a condition, so this variant has no pipeline outputs.
        data_check = dsl.component(data_changed_since_champion, base_image=settings.image("register"), install_kfp_package=False)

        @dsl.pipeline(name=PIPELINE_NAME, description="Scheduled retraining of a SmolVLM/Idefics3 model, skipped when the data is unchanged.")
        def vlmtune_scheduled_pipeline(
            sft_source: str,
            preference_source: str,
            base_model: str,
            registry: str,
            registry_name: str = "vlmtune-model",
            prepare_config: dict = {},
            sft_config: dict = {},
            dpo_config: dict = {},
            eval_config: dict = {},
            sft_checkpoint_uri: str = "",
            dpo_checkpoint_uri: str = "",
            prepare_shards: int = 1,
        ):
            sft_data, pref_data = prepare(sft_source, preference_source, base_model, prepare_config, prepare_shards)
            check = _configure(data_check(dataset=sft_data.outputs["dataset"], registry=registry, registry_name=registry_name),
                               "register", settings, "new data?")
            with dsl.If(check.output == True, name="new-data"):  # noqa: E712
                train_evaluate_register(sft_data, pref_data, base_model, registry, registry_name, sft_config, dpo_config,
                                        eval_config, sft_checkpoint_uri, dpo_checkpoint_uri)

        return vlmtune_scheduled_pipeline

    @dsl.pipeline(name=PIPELINE_NAME, description="Fine-tune a SmolVLM/Idefics3 model: QLoRA SFT, DPO, gated registration.")
    def vlmtune_pipeline(
        sft_source: str,
        preference_source: str,
        base_model: str,
        registry: str,
        registry_name: str = "vlmtune-model",
        prepare_config: dict = {},
        sft_config: dict = {},
        dpo_config: dict = {},
        eval_config: dict = {},
        sft_checkpoint_uri: str = "",
        dpo_checkpoint_uri: str = "",
        prepare_shards: int = 1,
    ) -> NamedTuple("PipelineOutputs", evaluation=dsl.Artifact, model=dsl.Model):
        sft_data, pref_data = prepare(sft_source, preference_source, base_model, prepare_config, prepare_shards)
        eval_task, dpo_task = train_evaluate_register(sft_data, pref_data, base_model, registry, registry_name, sft_config,
                                                      dpo_config, eval_config, sft_checkpoint_uri, dpo_checkpoint_uri)
        outputs = NamedTuple("PipelineOutputs", evaluation=dsl.Artifact, model=dsl.Model)
        return outputs(evaluation=eval_task.outputs["evaluation"], model=dpo_task.outputs["model"])

    return vlmtune_pipeline
