"""The node entry point: torchrun's command line from each engine's cluster environment, secrets by name."""
from __future__ import annotations

import json

import pytest

from components.common.launch import LaunchError, LaunchSettings, launch_settings_from_env, node_command, torchrun_argv
from components.common.launch import node
from components.common.launch.common import LAUNCH_ENV, SECRET_ENV

SCRIPT = ["-m", "components.sft.cli", "--dataset", "gs://b/d"]


def test_vertex_cluster_env_becomes_torchrun_flags():
    env = {"MASTER_ADDR": "workerpool0-0", "MASTER_PORT": "3333", "WORLD_SIZE": "4", "RANK": "2"}
    assert torchrun_argv(env, 8, SCRIPT) == ["torchrun", "--nnodes", "4", "--node_rank", "2", "--nproc_per_node", "8",
                                             "--master_addr", "workerpool0-0", "--master_port", "3333", *SCRIPT]


def test_vertex_cluster_spec_alone_gives_the_same_flags():
    spec = {"cluster": {"workerpool0": ["cmle-chief-0:2222"], "workerpool1": ["w-0:2222", "w-1:2222"]},
            "task": {"type": "workerpool1", "index": 1}}
    assert torchrun_argv({"CLUSTER_SPEC": json.dumps(spec)}, 2, SCRIPT)[:11] == [
        "torchrun", "--nnodes", "3", "--node_rank", "2", "--nproc_per_node", "2", "--master_addr", "cmle-chief-0",
        "--master_port", "2222"]


def test_kubeflow_pet_env_is_left_to_torchrun_but_the_process_count_is_ours():
    env = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "j-node-0-0.j", "PET_MASTER_PORT": "29400",
           "PET_NPROC_PER_NODE": "auto"}
    assert torchrun_argv(env, 4, SCRIPT) == ["torchrun", "--nproc_per_node", "4", *SCRIPT]


def test_outside_a_job_the_node_says_where_it_must_run():
    with pytest.raises(LaunchError, match="lacks MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK: run this entry point inside"):
        torchrun_argv({}, 1, SCRIPT)


def test_secrets_are_fetched_by_name_and_the_name_variable_dropped():
    fetched = []
    env = node.node_environment({SECRET_ENV: "HF_TOKEN=projects/p/secrets/hf/versions/latest", "KEEP": "1"},
                                access=lambda v: fetched.append(v) or "hf_value")
    assert env == {"HF_TOKEN": "hf_value", "KEEP": "1"}
    assert fetched == ["projects/p/secrets/hf/versions/latest"]
    with pytest.raises(LaunchError, match="'HF_TOKEN=hf_abc' is not ENV=projects/P/secrets/NAME/versions/V"):
        node.parse_secret_env("HF_TOKEN=hf_abc")


def test_main_execs_torchrun_with_the_command_the_launcher_built(monkeypatch):
    command = node_command("components.sft.cli", ["--dataset", "gs://b/d"], 2)
    assert command[:3] == ["python", "-m", "components.common.launch.node"]
    execs = []
    monkeypatch.setattr(node.os, "execvpe", lambda file, argv, env: execs.append((file, argv, env)))
    monkeypatch.setattr(node.os, "environ", {"PET_NNODES": "2"})
    node.main(command[3:])
    ((file, argv, env),) = execs
    assert file == "torchrun" and argv == ["torchrun", "--nproc_per_node", "2", *SCRIPT]
    assert node.main(["--nproc-per-node", "2"]) == 2  # no `--`: usage, not a crash


def test_launch_settings_come_from_the_env_compile_set():
    assert launch_settings_from_env({}).launcher == "local"
    s = launch_settings_from_env({LAUNCH_ENV: json.dumps({"launcher": "kubeflow", "image": "i", "runtime": "r"})})
    assert (s.launcher, s.image, s.runtime) == ("kubeflow", "i", "r")
    with pytest.raises(LaunchError, match=r"unknown settings \['machine'\]"):
        launch_settings_from_env({LAUNCH_ENV: json.dumps({"machine": "x"})})
    with pytest.raises(LaunchError, match="is not JSON.*recompile"):
        launch_settings_from_env({LAUNCH_ENV: "{"})
    assert LaunchSettings(launcher="slurm").problems() == ["launch.launcher: 'slurm' is not one of ('local', 'vertex', 'kubeflow')"]
