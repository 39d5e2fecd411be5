"""What the Vertex AI and Kubeflow launchers share: the launch settings a compiled pipeline hands a training step,
the job's description (:class:`LaunchSpec`), the command every node runs, and the submit -> wait -> cancel loop.

A training step with ``nodes > 1`` does not train in its own container: it describes one multi-node job (the same
image, the same step CLI under ``torchrun``, inputs and output by their gs:// URIs), submits it to the engine the
pipeline was compiled for, streams its state and logs, fails with the job's own error, cancels the job when the step
itself is cancelled, and then reads the ``vlmtune.model`` manifest the job's global rank 0 published.

Which engine: ``pipelines/compile.py`` puts the target's ``launch:`` settings, as JSON, into the step's environment
(:data:`LAUNCH_ENV`). Without it (kfp.local, ``vlmtune sft``) the launcher is ``local`` and only ``nodes: 1`` works.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Protocol

LAUNCH_ENV = "VLMTUNE_LAUNCH"
LAUNCHERS = ("local", "vertex", "kubeflow")
#: The in-job entry point every node runs (``python -m components.common.launch.node``).
NODE_MODULE = "components.common.launch.node"
#: Env var naming secrets the node entry point resolves before training (``ENV=secret-version,...``, Vertex only:
#: its CustomJob env takes plain values, so the job gets the secret's *name* and reads the value itself).
SECRET_ENV = "VLMTUNE_SECRET_ENV"
DEFAULT_POLL_SECONDS = 30.0


class LaunchError(ValueError):
    """The launch settings or the step config cannot make a multi-node job (raised before anything is submitted)."""


class LaunchedJobFailed(RuntimeError):
    """The multi-node job ended in failure; the message is the job's own error."""


class StepCancelled(KeyboardInterrupt):
    """The step was asked to stop (SIGTERM from the pipeline engine): the job it launched is cancelled."""


@dataclass
class LaunchSettings:
    """Per-target settings of launched training jobs (the `launch:` section of pipelines/configs/<target>.yaml)."""

    launcher: str = "local"
    #: The step's own image (compile fills it in per step).
    image: str = ""
    # Vertex AI
    project: str = ""
    location: str = ""
    service_account: str = ""
    machine_type: str = ""
    accelerator_type: str = ""
    #: Secret Manager version of the hub token, e.g. projects/P/secrets/hf-token/versions/latest (name, never value).
    hub_token_secret_version: str = ""
    network: str = ""
    # Kubeflow Trainer
    namespace: str = ""
    runtime: str = "torch-distributed"
    #: Kubernetes Secret and key of the hub token, exposed to every node as HF_TOKEN via secretKeyRef.
    hub_token_secret: str = ""
    hub_token_key: str = "HF_TOKEN"
    cpu: str = ""
    memory: str = ""
    # both
    poll_seconds: float = DEFAULT_POLL_SECONDS
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: Mapping | None, where: str = "launch") -> "LaunchSettings":
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LaunchError(f"{where}: unknown settings {unknown}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def problems(self, where: str = "launch") -> list[str]:
        """What is missing for this launcher to submit a job (all at once)."""
        found = []
        if self.launcher not in LAUNCHERS:
            return [f"{where}.launcher: {self.launcher!r} is not one of {LAUNCHERS}"]
        if self.launcher == "local":
            return found
        if not self.image:
            found.append(f"{where}.image: the step image the job's nodes run is required")
        if self.launcher == "vertex":
            for name in ("project", "location", "machine_type"):
                if not getattr(self, name):
                    found.append(f"{where}.{name}: required to submit a Vertex AI CustomJob")
            if self.hub_token_secret_version and "/secrets/" not in self.hub_token_secret_version:
                found.append(f"{where}.hub_token_secret_version: name a Secret Manager version like "
                             "projects/P/secrets/hf-token/versions/latest (the name, never the token)")
        if self.poll_seconds <= 0:
            found.append(f"{where}.poll_seconds: must be > 0, got {self.poll_seconds}")
        for key, value in self.env.items():
            if "TOKEN" in key.upper() or "SECRET" in key.upper():
                found.append(f"{where}.env.{key}: secrets do not go into job env values; use hub_token_secret"
                             f"{'_version' if self.launcher == 'vertex' else ''}")
            if not isinstance(value, str):
                found.append(f"{where}.env.{key}: must be a string (quote numbers and booleans)")
        return found


def launch_settings_from_env(environ: Mapping[str, str] | None = None) -> LaunchSettings:
    """The settings compile put into this step's environment; ``local`` when there are none."""
    raw = (os.environ if environ is None else environ).get(LAUNCH_ENV, "")
    if not raw:
        return LaunchSettings()
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LaunchError(f"${LAUNCH_ENV} is not JSON ({e}); recompile the pipeline with `vlmtune compile`") from e
    return LaunchSettings.from_dict(values, where=f"${LAUNCH_ENV}")


@dataclass
class LaunchSpec:
    """One multi-node training job, engine-neutral: what both launchers turn into their own request types."""

    name: str
    nodes: int
    gpus_per_node: int
    image: str
    #: The command every node runs (the node entry point, then torchrun, then the step CLI).
    command: list[str]
    #: Plain environment values (never secrets).
    env: dict[str, str] = field(default_factory=dict)
    #: Where the job writes its engine-side outputs (Vertex base_output_dir), a gs:// folder.
    output_dir: str = ""


def node_command(step_module: str, step_args: Iterable[str], gpus_per_node: int) -> list[str]:
    """The command of every node: ``python -m components.common.launch.node --nproc-per-node G -- -m MODULE ARGS``.
    The node entry point reads the cluster environment the engine set and runs torchrun with it."""
    return ["python", "-m", NODE_MODULE, "--nproc-per-node", str(gpus_per_node), "--", "-m", step_module,
            *[str(a) for a in step_args]]


def torchrun_argv(environ: Mapping[str, str], nproc_per_node: int, script: list[str]) -> list[str]:
    """torchrun's command line for this node, from the cluster environment the engine set.

    - Kubeflow Trainer's torch-distributed runtime sets ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
      ``PET_MASTER_PORT``, which torchrun reads itself: only ``--nproc_per_node`` is given (the runtime's own
      ``PET_NPROC_PER_NODE`` may say ``auto``).
    - Vertex AI sets ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` (the number of nodes) and ``RANK`` (this
      node's index) on each replica of a PyTorch job; with only ``CLUSTER_SPEC`` set they are derived from it.
    """
    if environ.get("PET_NNODES"):
        # The step config's gpus_per_node wins over the runtime's numProcPerNode: it is what the job was sized for.
        return ["torchrun", "--nproc_per_node", str(nproc_per_node), *script]
    cluster = _vertex_cluster(environ)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK") if not cluster.get(k)]
    if missing:
        raise LaunchError(f"the node's cluster environment lacks {', '.join(missing)}: run this entry point inside a "
                          "Vertex AI CustomJob or a Kubeflow TrainJob (torch-distributed runtime)")
    return ["torchrun", "--nnodes", cluster["WORLD_SIZE"], "--node_rank", cluster["RANK"],
            "--nproc_per_node", str(nproc_per_node), "--master_addr", cluster["MASTER_ADDR"],
            "--master_port", cluster["MASTER_PORT"], *script]


def _vertex_cluster(environ: Mapping[str, str]) -> dict[str, str]:
    found = {k: environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    if all(found.values()) or not environ.get("CLUSTER_SPEC"):
        return found
    # CLUSTER_SPEC: {"cluster": {"workerpool0": ["host:port"], "workerpool1": [...]}, "task": {"type": ..., "index": i}}
    spec = json.loads(environ["CLUSTER_SPEC"])
    pools = spec.get("cluster", {})
    hosts = [h for pool in sorted(p for p in pools if p.startswith("workerpool") and p < "workerpool2")
             for h in pools[pool]]
    task = spec.get("task", {})
    index = int(task.get("index", 0)) + (len(pools.get("workerpool0", [])) if task.get("type") == "workerpool1" else 0)
    addr, _, port = hosts[0].rpartition(":")
    return {"MASTER_ADDR": found["MASTER_ADDR"] or addr, "MASTER_PORT": found["MASTER_PORT"] or port,
            "WORLD_SIZE": found["WORLD_SIZE"] or str(len(hosts)), "RANK": found["RANK"] or str(index)}


# --------------------------------------------------------------------------------------------- submit, wait, cancel


class Job(Protocol):
    """What the wait loop needs from an engine's job handle."""

    name: str

    def poll(self) -> tuple[str, str | None]:
        """(state, error) where state is one of running / succeeded / failed / cancelled; error set on failure."""

    def cancel(self) -> None: ...

    def new_log_lines(self) -> Iterator[str]:
        """Log lines not yet shown (may be empty)."""


def wait_for_job(job: Job, *, poll_seconds: float, echo: Callable[[str], None] = print,
                 sleep: Callable[[float], None] = time.sleep) -> None:
    """Stream the job's state changes and logs until it ends; raise :class:`LaunchedJobFailed` with the job's
    own error when it fails or is cancelled from outside. SIGTERM (the pipeline engine cancelling this step) and
    Ctrl-C cancel the job, then re-raise, so no job outlives the step that launched it."""
    previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None

    def on_sigterm(signum, frame):
        raise StepCancelled(f"step got signal {signum}")

    if previous is not None:
        signal.signal(signal.SIGTERM, on_sigterm)
    last_state = None
    try:
        while True:
            state, error = job.poll()
            for line in job.new_log_lines():
                echo(line.rstrip("\n"))
            if state != last_state:
                echo(f"job {job.name}: {state}")
                last_state = state
            if state == "succeeded":
                return
            if state in ("failed", "cancelled"):
                raise LaunchedJobFailed(f"training job {job.name} {state}: {error or 'the engine gave no error message'}")
            sleep(poll_seconds)
    except KeyboardInterrupt:
        echo(f"step cancelled: cancelling job {job.name}")
        job.cancel()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
