"""prepare-data's image workers die with their parent: kill the real CLI mid-run, find no surviving worker.

The workers are held mid-run for certain: every row's image is a named pipe nobody writes to, so each worker
sits blocked in ``open()`` (as it would on a stalled network mount) until it is killed.

Run: pytest tests/components/prepare_data/test_parallel.py -q
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
WORKERS = 2

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "mkfifo"),
                                reason="needs /proc and named pipes (Linux)")


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[0], int(fields[19])


def _children(parent: int) -> dict[int, int]:
    """pid -> start time of every live child of ``parent``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[0] == parent and st[1] != "Z":
                found[int(entry.name)] = st[2]
    return found


def _alive(pid: int, started: int) -> bool:
    st = _stat(pid)
    return st is not None and st[2] == started and st[1] != "Z"  # a zombie holds no memory; a reused pid is not ours


def _blocking_source(root: Path, n: int = 40) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        os.mkfifo(root / "images" / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"images/{i}.png", "question": "q", "answer": "a"})
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("sig,use_pdeathsig", [
    (signal.SIGKILL, True),
    (signal.SIGTERM, True),
    (signal.SIGKILL, False),  # the portable fallback: a thread in each worker polls its parent pid
], ids=["sigkill", "sigterm", "sigkill-polling-fallback"])
def test_killing_prepare_data_leaves_no_worker_behind(tmp_path, sig, use_pdeathsig):
    src = _blocking_source(tmp_path / "src")
    driver = (
        "import sys; import components.prepare_data.parallel as p; "
        f"p.USE_PDEATHSIG = {use_pdeathsig}; "
        "from components.prepare_data import cli; "
        f"sys.exit(cli.main(['--source', {str(src)!r}, '--output', {str(tmp_path / 'out')!r}, "
        f"'--no-progress', '--num-workers', '{WORKERS}']))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    parent = subprocess.Popen([sys.executable, "-c", driver], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 60
        while len(workers) < WORKERS and time.monotonic() < deadline and parent.poll() is None:
            workers = _children(parent.pid)
            time.sleep(0.05)
        assert parent.poll() is None, f"prepare-data ended before it could be killed: {parent.communicate()}"
        assert len(workers) == WORKERS, f"expected {WORKERS} workers of pid {parent.pid}, found {workers}"
        time.sleep(0.5)  # let the workers reach the blocking read
        assert all(_alive(pid, started) for pid, started in workers.items())
        parent.send_signal(sig)
        assert parent.wait(timeout=10) == -sig
        deadline = time.monotonic() + 5
        while any(_alive(pid, started) for pid, started in workers.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = sorted(pid for pid, started in workers.items() if _alive(pid, started))
        assert survivors == [], f"workers {survivors} outlived their parent (killed with {sig.name})"
        assert not (tmp_path / "out" / "manifest.json").exists()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid, started in workers.items():  # never leak a process, even when the test fails
            if _alive(pid, started):
                os.kill(pid, signal.SIGKILL)
