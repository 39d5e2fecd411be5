"""The entry point of every node of a launched training job: read the cluster environment the engine set, fetch
secrets named in ``$VLMTUNE_SECRET_ENV`` (Vertex AI), then exec ``torchrun`` on the step CLI.

    python -m components.common.launch.node --nproc-per-node 8 -- -m components.sft.cli --dataset gs://... ...

Everything after ``--`` is torchrun's script part (``-m MODULE ARGS``); see :func:`common.torchrun_argv` for the
flags each engine's environment gives.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping

from components.common.launch.common import SECRET_ENV, LaunchError, torchrun_argv


def parse_secret_env(value: str) -> dict[str, str]:
    """``HF_TOKEN=projects/p/secrets/hf/versions/latest,OTHER=...`` -> {env: secret version}."""
    pairs = {}
    for item in filter(None, (v.strip() for v in value.split(","))):
        env, sep, version = item.partition("=")
        if not sep or not env or "/secrets/" not in version:
            raise LaunchError(f"${SECRET_ENV}: {item!r} is not ENV=projects/P/secrets/NAME/versions/V")
        pairs[env] = version
    return pairs


def access_secret_version(version: str) -> str:
    """The payload of a Secret Manager secret version, read with the node's own service account (REST, no extra
    dependency: google-auth comes with google-cloud-storage)."""
    import base64

    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    response = AuthorizedSession(credentials).get(f"https://secretmanager.googleapis.com/v1/{version}:access", timeout=60)
    if response.status_code != 200:
        raise LaunchError(f"reading secret {version} failed ({response.status_code}: {response.text[:200]}); the job's "
                          "service account needs roles/secretmanager.secretAccessor on it")
    return base64.b64decode(response.json()["payload"]["data"]).decode()


def node_environment(environ: Mapping[str, str], access: Callable[[str], str] = access_secret_version) -> dict[str, str]:
    """The environment torchrun runs with: this one plus every secret of ``$VLMTUNE_SECRET_ENV`` resolved."""
    env = dict(environ)
    for name, version in parse_secret_env(env.pop(SECRET_ENV, "")).items():
        env[name] = access(version)
    return env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m components.common.launch.node --nproc-per-node N -- -m MODULE ARGS...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m components.common.launch.node")
    parser.add_argument("--nproc-per-node", type=int, required=True, help="Processes (GPUs) per node.")
    args = parser.parse_args(argv[:split])
    try:
        command = torchrun_argv(os.environ, args.nproc_per_node, argv[split + 1:])
        env = node_environment(os.environ)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("node: " + " ".join(command), flush=True)
    os.execvpe(command[0], command, env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
