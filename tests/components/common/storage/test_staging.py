"""Staging folders of local_output: a writer killed by SIGKILL leaves one; the next writer of the same output
removes it, and never a live writer's (components/common/storage/staging.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from components.common import artifacts, storage
from components.common.storage import staging

REPO = Path(__file__).resolve().parents[4]

#: A writer that stages a few files, says so (READY file), then waits for GO: exits 3 from inside the body
#: (local_output then cleans up), or is killed before.
WRITER = r"""
import sys, time
from pathlib import Path
from components.common import storage
uri, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
with storage.local_output(uri) as folder:
    for i in range(5):
        (folder / f"shard-{i}.bin").write_bytes(bytes([i]) * 10_000)
    ready.write_text(str(folder))
    while not go.exists():
        time.sleep(0.02)
    raise SystemExit(3)
"""


def start_writer(uri: str, tmp_path: Path, tag: str, env: dict | None = None) -> tuple[subprocess.Popen, Path, Path]:
    ready, go = tmp_path / f"{tag}.ready", tmp_path / f"{tag}.go"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, uri, str(ready), str(go)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, f"writer {tag} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"writer {tag} did not start"
        time.sleep(0.02)
    return proc, Path(ready.read_text()), go


def partial(parent: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(prefix))


def test_rerun_removes_a_killed_writers_staging_but_not_a_live_writers(tmp_path):
    out = tmp_path / "out"
    killed, killed_folder, _ = start_writer(str(out), tmp_path, "killed")
    killed.send_signal(signal.SIGKILL)  # pre-emption mid-write: no cleanup code runs
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert killed_folder.is_dir() and len(list(killed_folder.iterdir())) == 5  # it really was left behind
    assert partial(tmp_path, ".out.partial-") == [killed_folder.name, killed_folder.name + ".lock"]

    live, live_folder, go = start_writer(str(out), tmp_path, "live")  # a concurrent writer, still running
    with storage.local_output(str(out)) as folder:  # the rerun
        (folder / "data.bin").write_bytes(b"rerun")
        artifacts.write_manifest(str(folder), {"kind": "k"})
        assert not killed_folder.exists()  # removed on entry: its writer is dead
    assert artifacts.read_manifest(str(out))["kind"] == "k" and (out / "data.bin").read_bytes() == b"rerun"
    # Only the live writer's folder (all its files) and its lock file remain; the rerun left nothing.
    assert partial(tmp_path, ".out.partial-") == [live_folder.name, live_folder.name + ".lock"]
    assert len(list(live_folder.iterdir())) == 5

    go.write_text("")
    assert live.wait(timeout=30) == 3  # its body ended in an error: it cleaned up after itself
    assert partial(tmp_path, ".out.partial-") == []


def test_removal_is_per_output_and_only_for_folders_it_can_judge(tmp_path, monkeypatch):
    token = "0123456789ab"
    mine = tmp_path / f".out.partial-{token}"
    unlocked_claim = tmp_path / f".out.partial-{'1' * 12}.lock-claim"
    fresh_claim = tmp_path / f".out.partial-{'2' * 12}.lock-claim"
    lockless = tmp_path / f".out.partial-{'3' * 12}"  # no lock file (e.g. made before locks): not judged
    legacy = tmp_path / ".out.partial-k2j4_x9q"  # tempfile.mkdtemp's name of old versions: not matched
    others = [tmp_path / f".out2.partial-{token}", tmp_path / f".out.partial-x.partial-{token}"]
    for folder in (mine, lockless, legacy, *others):
        folder.mkdir()
        (folder / "f").write_bytes(b"f")
    for folder in (mine, *others):
        folder.with_name(folder.name + ".lock").write_text("host 1\n")  # unlocked: their writers are dead
    unlocked_claim.write_text("")
    fresh_claim.write_text("")
    old = time.time() - staging.CLAIM_GRACE_S - 5
    os.utime(unlocked_claim, (old, old))

    removed = staging.remove_dead(tmp_path, "out")
    assert removed == [mine, unlocked_claim.with_name(unlocked_claim.name[: -len(".lock-claim")])]
    assert not mine.exists() and not mine.with_name(mine.name + ".lock").exists() and not unlocked_claim.exists()
    assert fresh_claim.exists() and lockless.is_dir() and legacy.is_dir()  # too young / no lock / not ours
    assert all(f.is_dir() and f.with_name(f.name + ".lock").exists() for f in others)  # other outputs' folders

    # A filesystem that cannot lock: nothing is judged dead, so nothing is removed.
    (mine).mkdir()
    mine.with_name(mine.name + ".lock").write_text("host 1\n")

    def no_locks(fd, op):
        raise OSError(37, "No locks available")  # ENOLCK

    monkeypatch.setattr(staging.fcntl, "flock", no_locks)
    assert staging.remove_dead(tmp_path, "out") == [] and mine.is_dir()


def test_a_writer_on_a_filesystem_without_locks_still_works(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(38, "Function not implemented")  # ENOSYS, as on some FUSE mounts

    monkeypatch.setattr(staging.fcntl, "flock", no_locks)
    with storage.local_output(str(tmp_path / "out")) as folder:
        (folder / "a").write_text("a")
        artifacts.write_manifest(str(folder), {"kind": "k"})
    assert artifacts.is_complete(str(tmp_path / "out"))
    assert partial(tmp_path, ".out.partial-") == []
