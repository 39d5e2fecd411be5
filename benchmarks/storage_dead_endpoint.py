"""Benchmark: how long storage operations, and a whole prepare-data step, take to fail on a dead GCS endpoint.

    python benchmarks/storage_dead_endpoint.py [--deadline 5] [--files 20] [--modes killed,blackhole] [--no-step]

fake-gcs-server (tests/fixtures_gcs.py) behind the fault proxy (tests/fault_proxy.py), holding a tree of
``--files`` files, a tiny model and demo data; then the endpoint dies:

- ``killed``: the emulator is SIGKILLed, the proxy answers 502 to every request (a dead backend behind a
  load balancer); ``blackhole``: the proxy accepts connections and never answers (a dead host or a network
  partition: each request waits for its timeout).

Measured with ``VLMTUNE_GCS_RETRY_DEADLINE_S=--deadline`` and the default backoff, per-request timeout (60 s)
and 8 parallel transfers: ``upload_dir``/``download_files``/``download_dir``/``delete`` of the tree and one
``write_text``, each in this process; then ``vlmtune prepare-data`` (as a step container runs it) with the
endpoint dead from its start and dying at its first upload (the publish), timed from the moment the
endpoint died to the error line and to the exit. Each figure is also given as a multiple of the deadline;
the storage layer promises about 1.0 (one deadline per operation, however many files).
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class Endpoint:
    """A private emulator behind the fault proxy; ``die(mode)`` kills it (see the module docstring)."""

    def __init__(self) -> None:
        from tests.fault_proxy import FaultProxy
        from tests.fixtures_gcs import EmulatorProcess

        self.emulator = EmulatorProcess().start()
        self.proxy = FaultProxy(self.emulator.url).start()
        self.died_at: float | None = None
        self.requests: list[float] = []
        decide = self.proxy._decide

        def counted(method: str, path: str):
            self.requests.append(time.monotonic())
            return decide(method, path)

        self.proxy._decide = counted

    def die(self, mode: str) -> None:
        self.died_at = time.monotonic()
        if mode == "killed":
            self.emulator.kill()
        else:
            self.proxy.slow_s = 3600.0
            self.proxy.set_rates(slow=1.0)

    def close(self) -> None:
        self.proxy.stop()
        self.emulator.kill()


def time_operations(mode: str, n_files: int, deadline: float) -> dict:
    from components.common import storage
    from components.common.storage import gcs

    endpoint = Endpoint()
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint.proxy.url
    gcs.client.cache_clear()
    try:
        gcs.client().create_bucket("dead")
        src = Path(tempfile.mkdtemp(prefix="vlmtune-bench-dead-"))
        for i in range(n_files):
            (src / f"f{i}.bin").write_bytes(os.urandom(2000))
        storage.upload_dir(src, "gs://dead/tree")
        endpoint.die(mode)
        names = [f"gs://dead/tree/f{i}.bin" for i in range(n_files)]
        ops = {
            "upload_dir": lambda: storage.upload_dir(src, "gs://dead/tree2"),
            "download_files": lambda: storage.download_files(names, Path(tempfile.mkdtemp(dir=src))),
            "download_dir": lambda: storage.download_dir("gs://dead/tree", Path(tempfile.mkdtemp(dir=src))),
            "delete": lambda: storage.delete("gs://dead/tree"),
            "write_text": lambda: storage.write_text("gs://dead/x", "x"),
        }
        out = {}
        for name, op in ops.items():
            started = time.monotonic()
            try:
                op()
                error = "no error"
            except Exception as e:  # noqa: BLE001 - what fails, and how, is the measurement
                error = f"{type(e).__name__}: {e}"
            took = time.monotonic() - started
            out[name] = {"seconds": round(took, 2), "x_deadline": round(took / deadline, 2), "error": error[:300]}
            print(f"{mode:9s} {name:15s} failed after {took:6.1f}s ({took / deadline:.2f} x deadline)", flush=True)
        return out
    finally:
        endpoint.close()


def time_step(mode: str, when: str, deadline: float) -> dict:
    """prepare-data as a subprocess with the endpoint dead from its start, or dying at its first upload."""
    from components.common import storage
    from components.common.demo_data import write_demo_data
    from components.common.storage import gcs
    from components.common.tiny_model import build_tiny_model

    endpoint = Endpoint()
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint.proxy.url
    gcs.client.cache_clear()
    local = Path(tempfile.mkdtemp(prefix="vlmtune-bench-dead-step-"))
    try:
        gcs.client().create_bucket("dead")
        build_tiny_model(local / "model")
        write_demo_data(local / "data", rows=40, preference_rows=20)
        storage.upload_dir(local / "model", "gs://dead/models/tiny")
        storage.upload_dir(local / "data", "gs://dead/sources/demo")
        if when == "start":
            endpoint.die(mode)
            endpoint.died_at = None  # count from the step's first request, not from its start-up

            def on_request(seq: int) -> None:
                if endpoint.died_at is None:
                    endpoint.died_at = time.monotonic()
        else:
            def on_request(seq: int) -> None:
                method, path, _ = endpoint.proxy.log[-1]
                if endpoint.died_at is None and method == "POST" and "/upload/" in path:
                    endpoint.die(mode)
        endpoint.proxy.on_request = on_request
        env = {**os.environ, "VLMTUNE_GCS_RETRY_DEADLINE_S": str(deadline), "PYTHONPATH": str(REPO),
               "HF_HUB_OFFLINE": "1", "VLMTUNE_CACHE": str(local / "cache")}
        argv = [sys.executable, "-m", "pipelines.cli", "prepare-data", "--source", "gs://dead/sources/demo/sft",
                "--output", "gs://dead/out/dataset", "--task", "sft", "--processor", "gs://dead/models/tiny",
                "--num-workers", "0", "--no-progress"]
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        error_at, error = None, ""
        for line in proc.stderr:
            if "storage error" in line and error_at is None:
                error_at, error = time.monotonic(), line.strip()
        proc.wait()
        exited = time.monotonic()
        died = endpoint.died_at or exited
        out = {"exit": proc.returncode, "error_after_s": round((error_at or exited) - died, 2),
               "exit_after_s": round(exited - died, 2), "x_deadline": round(((error_at or exited) - died) / deadline, 2),
               "error": error[:300]}
        print(f"{mode:9s} prepare-data, dead at {when:7s}: error {out['error_after_s']:5.1f}s and exit "
              f"{out['exit_after_s']:5.1f}s after the endpoint died (exit {proc.returncode})", flush=True)
        return out
    finally:
        endpoint.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline", type=float, default=5.0, help="VLMTUNE_GCS_RETRY_DEADLINE_S for every run")
    parser.add_argument("--files", type=int, default=20, help="files in the tree the operations move")
    parser.add_argument("--modes", default="killed,blackhole", help="comma-separated: killed, blackhole")
    parser.add_argument("--no-step", action="store_true", help="skip the prepare-data runs")
    args = parser.parse_args(argv)
    os.environ["VLMTUNE_GCS_RETRY_DEADLINE_S"] = str(args.deadline)
    for k in ("VLMTUNE_GCS_RETRY_INITIAL_S", "VLMTUNE_GCS_RETRY_MAX_S", "VLMTUNE_GCS_TIMEOUT_S", "VLMTUNE_GCS_MAX_WORKERS"):
        os.environ.pop(k, None)
    summary: dict = {"deadline_s": args.deadline, "files": args.files}
    for mode in args.modes.split(","):
        summary[mode] = {"operations": time_operations(mode, args.files, args.deadline)}
        if not args.no_step:
            summary[mode]["prepare_data"] = {when: time_step(mode, when, args.deadline) for when in ("start", "publish")}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
