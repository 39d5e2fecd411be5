"""Storage on local paths and file:// URIs, and the artifact manifest contract (no emulator needed)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from components.common import artifacts, storage
from components.common.artifacts import IncompleteArtifactError
from components.common.storage import StorageError


@pytest.fixture(params=["path", "file"])
def root(request, tmp_path) -> str:
    """The same tests on plain paths and on file:// URIs."""
    return str(tmp_path) if request.param == "path" else f"file://{tmp_path}"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or ".partial-" in p.name)


# ----------------------------------------------------------------------------------------------- URIs

def test_uri_helpers(tmp_path):
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/x") and not storage.is_remote(f"file://{tmp_path}")
    assert storage.to_local_path(f"file://{tmp_path}/a") == tmp_path / "a"
    assert storage.to_local_path("file://localhost/tmp/a") == Path("/tmp/a")
    assert storage.to_local_path(tmp_path / "a") == tmp_path / "a"
    assert storage.join("gs://b/x/", "y", "/z/") == "gs://b/x/y/z"
    assert storage.join("gs://b", "", "m.json") == "gs://b/m.json"
    assert storage.join(f"file://{tmp_path}", "a", "b") == str(tmp_path / "a" / "b")
    assert storage.join(str(tmp_path), "/etc") == str(tmp_path / "etc")  # parts never escape the folder
    with pytest.raises(StorageError, match="not a local path"):
        storage.to_local_path("gs://b/x")


@pytest.mark.parametrize("uri, match", [
    ("gs://", "names no bucket"),
    ("gs:///path/x", "names no bucket"),
    ("gs://My_Bucket/x", "not a valid bucket name"),
    ("gs://ab/x", "not a valid bucket name"),
    ("gs://bucket/a//b", "empty"),
    ("gs://bucket//a", "empty"),
    ("gs://bucket/a/../b", "'..'"),
    ("s3://bucket/x", "unsupported URI scheme"),
    ("gcs://bucket/x", "Did you mean gs://"),
    ("file://relative/path", "absolute path"),
])
def test_bad_uris_are_clear_errors(uri, match):
    with pytest.raises(StorageError, match=match) as e:
        storage.read_bytes(uri)
    assert uri.split("/")[0] in str(e.value) or match in str(e.value)


# ------------------------------------------------------------------------------------------ read/write

def test_write_read_overwrite_atomic(root, tmp_path):
    uri = storage.join(root, "deep/er/a.txt")
    storage.write_text(uri, "one")
    storage.write_text(uri, "two")
    assert storage.read_text(uri) == "two" and storage.exists(uri)
    assert leftovers(tmp_path) == []  # no temp files left behind
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))
    with pytest.raises(StorageError, match="folder"):
        storage.read_bytes(storage.join(root, "deep"))


def test_concurrent_writers_never_tear_a_file(tmp_path):
    uri = str(tmp_path / "x.bin")
    payloads = [bytes([i]) * 200_000 for i in range(6)]
    errors = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(5):
                storage.write_bytes(uri, data)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for _ in range(50):
        if Path(uri).exists():
            assert storage.read_bytes(uri) in payloads
    for t in threads:
        t.join()
    assert not errors and storage.read_bytes(uri) in payloads and leftovers(tmp_path) == []


def test_write_if_absent(root, tmp_path):
    uri = storage.join(root, "v/claim")
    assert storage.write_if_absent(uri, b"first") is True
    assert storage.write_if_absent(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first" and leftovers(tmp_path) == []


def test_write_if_absent_race_exactly_one_wins(tmp_path):
    uri = str(tmp_path / "claim")
    barrier = threading.Barrier(8)
    results: dict[int, bool] = {}

    def claim(i: int) -> None:
        barrier.wait()
        results[i] = storage.write_if_absent(uri, f"w{i}".encode())

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1 and storage.read_text(uri) == f"w{winners[0]}"


def test_write_if_absent_without_hard_links(tmp_path, monkeypatch):
    def no_link(*a, **k):
        raise PermissionError(1, "Operation not permitted")  # EPERM, as on some FUSE mounts

    monkeypatch.setattr("os.link", no_link)
    uri = str(tmp_path / "claim")
    assert storage.write_if_absent(uri, b"a") is True
    assert storage.write_if_absent(uri, b"b") is False
    assert storage.read_bytes(uri) == b"a"


def test_list_delete_exists(root, tmp_path):
    for rel in ("a/1", "a/b/2", "c"):
        storage.write_text(storage.join(root, rel), rel)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in storage.list_files(root)] == ["a/1", "a/b/2", "c"]
    assert storage.list_files(storage.join(root, "nope")) == []
    storage.delete(storage.join(root, "a"))
    storage.delete(storage.join(root, "c"))
    storage.delete(storage.join(root, "never-there"))
    assert not storage.exists(storage.join(root, "a")) and storage.list_files(root) == []


def test_list_files_while_another_run_deletes_a_folder(tmp_path, monkeypatch):
    """A registration retracting its copy while another lists versions/ (CI saw FileNotFoundError from rglob)."""
    import os
    import shutil

    for rel in ("keep/1", "gone/model/2", "gone/model/deep/3"):
        storage.write_text(str(tmp_path / rel), rel)
    real_scandir = os.scandir

    def scandir_after_delete(path="."):
        if not isinstance(path, int) and Path(path).name == "model":  # vanishes between being seen and opened
            shutil.rmtree(path, ignore_errors=True)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_after_delete)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in storage.list_files(str(tmp_path))] == ["keep/1"]


def test_upload_download_dir(root, tmp_path):
    src = tmp_path / "src"
    (src / "x" / "y").mkdir(parents=True)
    (src / "x" / "y" / "f").write_bytes(b"f")
    (src / "g").write_bytes(b"g")
    (src / "skip.json").write_bytes(b"s")
    storage.upload_dir(src, storage.join(root, "up"), exclude=("skip.json",))
    assert sorted(Path(p).name for p in storage.list_files(storage.join(root, "up"))) == ["f", "g"]
    out = storage.download_dir(storage.join(root, "up"), tmp_path / "down")
    assert (out / "x" / "y" / "f").read_bytes() == b"f"
    with pytest.raises(FileNotFoundError):
        storage.download_dir(storage.join(root, "nope"), tmp_path / "d2")
    with pytest.raises(FileNotFoundError):
        storage.upload_dir(tmp_path / "nope", storage.join(root, "up2"))


def test_download_files(root, tmp_path):
    for rel in ("ds/train/0.parquet", "ds/train/1.parquet", "ds/eval/0.parquet", "ds/manifest.json"):
        storage.write_text(storage.join(root, rel), rel)
    uris = [storage.join(root, rel) for rel in ("ds/eval/0.parquet", "ds/train/1.parquet", "ds/manifest.json")]
    out = tmp_path / "dl"
    got = storage.download_files(uris, out)
    assert got == [out / "eval/0.parquet", out / "train/1.parquet", out / "manifest.json"]  # order as given
    assert [p.read_text() for p in got] == ["ds/eval/0.parquet", "ds/train/1.parquet", "ds/manifest.json"]
    assert not (out / "train/0.parquet").exists()  # only the files named
    one = storage.download_files([storage.join(root, "ds/train/0.parquet")], tmp_path / "one")
    assert one == [tmp_path / "one" / "0.parquet"] and one[0].read_text() == "ds/train/0.parquet"
    twice = storage.download_files([uris[0], uris[0]], tmp_path / "twice")
    assert twice == [tmp_path / "twice" / "0.parquet"] * 2
    # "..": names are taken from the normalised path, so nothing lands outside the target folder.
    odd = storage.download_files([storage.join(root, "ds/train/../eval/0.parquet"), uris[1]], tmp_path / "odd")
    assert odd == [tmp_path / "odd" / "eval/0.parquet", tmp_path / "odd" / "train/1.parquet"]
    in_place = storage.download_files([uris[2]], tmp_path / "ds")  # the file's own folder: nothing to copy
    assert in_place == [tmp_path / "ds" / "manifest.json"] and in_place[0].read_text() == "ds/manifest.json"
    assert storage.download_files([], out) == []
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.download_files([storage.join(root, "ds/nope")], out)
    with pytest.raises(StorageError, match="is a folder"):
        storage.download_files([storage.join(root, "ds/train")], out)
    with pytest.raises(StorageError, match="mixes gs:// URIs and local paths"):
        storage.download_files([uris[0], "gs://bucket/ds/x"], out)


def test_local_input(root):
    storage.write_text(storage.join(root, "in/a.txt"), "a")
    with storage.local_input(storage.join(root, "in")) as folder:
        assert (folder / "a.txt").read_text() == "a"
    with pytest.raises(FileNotFoundError):
        with storage.local_input(storage.join(root, "missing")):
            pass


# ---------------------------------------------------------------------------------------- local_output

def test_local_output_publishes_on_success(root, tmp_path):
    uri = storage.join(root, "out")
    with storage.local_output(uri) as folder:
        (folder / "sub").mkdir()
        (folder / "sub" / "data.bin").write_bytes(b"d")
        (folder / "empty").mkdir()
        artifacts.write_manifest(str(folder), {"kind": "dataset"})
        assert not artifacts.is_complete(uri) and not (tmp_path / "out").exists()  # untouched while running
    assert artifacts.read_manifest(uri, kind="dataset")["kind"] == "dataset"
    assert (tmp_path / "out" / "sub" / "data.bin").read_bytes() == b"d" and (tmp_path / "out" / "empty").is_dir()
    assert leftovers(tmp_path) == []


def test_local_output_body_raises_marks_nothing(root, tmp_path):
    uri = storage.join(root, "out")
    with pytest.raises(KeyError):
        with storage.local_output(uri) as folder:
            (folder / "half.bin").write_bytes(b"h")
            artifacts.write_manifest(str(folder), {"kind": "dataset"})
            raise KeyError("crash after the manifest was written")
    assert not artifacts.is_complete(uri)
    assert not (tmp_path / "out" / "half.bin").exists() and leftovers(tmp_path) == []
    with pytest.raises(IncompleteArtifactError, match="did not finish"):
        artifacts.read_manifest(uri)


def test_local_output_rerun_invalidates_old_manifest(root, tmp_path):
    uri = storage.join(root, "out")
    with storage.local_output(uri) as folder:
        (folder / "v").write_text("1")
        artifacts.write_manifest(str(folder), {"v": 1})
    with pytest.raises(RuntimeError):
        with storage.local_output(uri) as folder:
            assert not artifacts.is_complete(uri)
            raise RuntimeError
    assert not artifacts.is_complete(uri) and (tmp_path / "out" / "v").read_text() == "1"
    with storage.local_output(uri) as folder:
        (folder / "v").write_text("2")
        artifacts.write_manifest(str(folder), {"v": 2})
    assert artifacts.read_manifest(uri)["v"] == 2 and (tmp_path / "out" / "v").read_text() == "2"


def test_local_output_manifest_after_block_and_marker_conflict(root):
    uri = storage.join(root, "out")
    with storage.local_output(uri) as folder:
        (folder / "f").write_text("x")
    assert not artifacts.is_complete(uri)
    artifacts.write_manifest(uri, {"kind": "k"})  # pattern 2: manifest straight to the URI, after the block
    assert artifacts.is_complete(uri)
    with pytest.raises(StorageError, match="appeared while local_output"):
        with storage.local_output(uri) as folder:
            artifacts.write_manifest(str(folder), {"who": "me"})
            artifacts.write_manifest(uri, {"who": "rival"})
    assert artifacts.read_manifest(uri)["who"] == "rival"


def test_local_output_on_a_file_is_an_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="is a file"):
        with storage.local_output(str(tmp_path / "f")):
            pass


# ------------------------------------------------------------------------------------------- artifacts

def test_manifest_contract(root):
    uri = storage.join(root, "art")
    assert not artifacts.is_complete(uri)
    written = artifacts.write_manifest(uri, {"kind": "model", "path": Path("/x")})
    assert "created_at" in written
    assert artifacts.read_manifest(uri, kind="model")["path"] == "/x"
    with pytest.raises(IncompleteArtifactError, match="'dataset' artifact was expected"):
        artifacts.read_manifest(uri, kind="dataset")
    artifacts.invalidate(uri)
    assert not artifacts.is_complete(uri)
    storage.write_text(storage.join(uri, "manifest.json"), "{not json")
    with pytest.raises(IncompleteArtifactError, match="not valid JSON"):
        artifacts.read_manifest(uri)
    storage.write_text(storage.join(uri, "manifest.json"), json.dumps([1]))
    with pytest.raises(IncompleteArtifactError, match="not an object"):
        artifacts.read_manifest(uri)


def test_hash_files(root):
    a, b = storage.join(root, "a"), storage.join(root, "b")
    storage.write_bytes(a, b"1")
    storage.write_bytes(b, b"2")
    assert artifacts.hash_files([a, b]) != artifacts.hash_files([b, a])
    assert artifacts.hash_files([a, b]) == artifacts.hash_files([a, b])


# ------------------------------------------------------------------------------- refused writes (real)

REFUSED_SCRIPT = r'''
import json, os, sys
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from components.common import artifacts, storage
from components.common.cli import run_main

root = Path(sys.argv[1])
out = {}

def attempt(case, fn):
    try:
        fn()
        out[case] = {"error": None}
    except Exception as e:
        out[case] = {"error": type(e).__name__, "storage": isinstance(e, storage.StorageError), "msg": str(e)}

def publish(uri, body):
    with storage.local_output(uri) as folder:
        body(folder)
        artifacts.write_manifest(str(folder), {"kind": "test"})

def small(folder):
    (folder / "x.bin").write_bytes(b"x")

def big_parquet(folder):  # what prepare-data's shard writer does; pyarrow's error names no file
    pq.write_table(pa.table({"x": [os.urandom(1000) for _ in range(1000)]}), folder / "part-0.parquet")

src, big_src = root / "src", root / "big-src"
for d, size in ((src, 100), (big_src, 600_000)):
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f.bin").write_bytes(os.urandom(size))

ro = root / "ro"
attempt("ro/write_bytes", lambda: storage.write_bytes(str(ro / "a.bin"), b"x"))
attempt("ro/write_if_absent", lambda: storage.write_if_absent(str(ro / "claim"), b"x"))
attempt("ro/local_output", lambda: publish(str(ro / "existing"), small))
attempt("ro/upload_dir", lambda: storage.upload_dir(src, str(ro / "up")))
out["ro/exit"] = run_main(lambda: storage.write_bytes(str(ro / "a.bin"), b"x"), prefix="step")

full = root / "full"
attempt("full/write_bytes", lambda: storage.write_bytes(str(full / "big.bin"), os.urandom(600_000)))
attempt("full/write_if_absent", lambda: storage.write_if_absent(str(full / "claim"), os.urandom(600_000)))
attempt("full/local_output", lambda: publish(str(full / "out"), big_parquet))
attempt("full/upload_dir", lambda: storage.upload_dir(big_src, str(full / "up")))
out["full/left"] = sorted(p.name for p in full.rglob("*") if ".tmp-" in p.name or ".partial-" in p.name)

try:  # no permission: only as another user than root (root writes through any mode bits)
    os.setgid(65534)
    os.setuid(65534)
except OSError as e:
    out["denied/skipped"] = str(e)
else:
    locked = root / "locked"
    attempt("denied/write_bytes", lambda: storage.write_bytes(str(locked / "a.bin"), b"x"))
    attempt("denied/write_if_absent", lambda: storage.write_if_absent(str(locked / "claim"), b"x"))
    attempt("denied/local_output", lambda: publish(str(locked / "out"), small))
    attempt("denied/upload_dir", lambda: storage.upload_dir(src, str(locked / "up")))
print("RESULT " + json.dumps(out))
'''

MOUNTS = r'''set -e
mount -t tmpfs -o size=16m,mode=0755 tmpfs "$1"
mkdir -p "$1/ro-src/existing" "$1/ro" "$1/full" "$1/locked"
echo old > "$1/ro-src/existing/x.bin"
mount --bind "$1/ro-src" "$1/ro"
mount -o remount,bind,ro "$1/ro"
mount -t tmpfs -o size=256k tmpfs "$1/full"
chmod 0777 "$1"; chmod 0555 "$1/locked"
echo MOUNTED
shift
exec "$@"
'''


@pytest.fixture(scope="module")
def refused_writes() -> dict:
    """Every storage write against a real read-only bind mount, a real full tmpfs (256 KiB) and, as uid
    65534, a real folder without write permission; each in a private mount namespace (`unshare --mount`), so
    nothing is mounted outside this one child process. Skips where mounts cannot be made (no root, no
    user namespaces); the simulated tests below cover the same errors everywhere."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    if not shutil.which("unshare"):
        pytest.skip("no `unshare`: cannot make a private read-only or full mount here")
    # Directly in /tmp (not pytest's 0700 tree) so that uid 65534 can reach it; empty again afterwards.
    root = tempfile.mkdtemp(prefix="vlmtune-refused-", dir="/tmp")
    os.chmod(root, 0o755)
    repo = Path(__file__).resolve().parents[4]
    env = {**os.environ, "PYTHONPATH": str(repo), "VLMTUNE_LOG_LEVEL": "ERROR"}
    try:
        for userns in ([], ["--user", "--map-root-user"]):
            proc = subprocess.run(
                ["unshare", *userns, "--mount", "--propagation", "private", "sh", "-c", MOUNTS, "mounts", root,
                 sys.executable, "-c", REFUSED_SCRIPT, root],
                capture_output=True, text=True, env=env, cwd=repo, timeout=120)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line:
                return json.loads(line[len("RESULT "):])
            if "MOUNTED" in proc.stdout:  # the mounts worked: the script itself broke, which is a failure
                pytest.fail(f"the refused-writes script failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        pytest.skip(f"cannot mount in a private namespace here: {proc.stderr.strip()[-300:]}")
    finally:
        os.rmdir(root)


@pytest.mark.parametrize("op", ["write_bytes", "write_if_absent", "local_output", "upload_dir"])
def test_read_only_storage_is_a_clear_error(refused_writes, op):
    got = refused_writes[f"ro/{op}"]
    assert got["storage"], got  # a StorageError: the step's CLI prints one line and exits 2
    assert "read-only file system" in got["msg"] and "/ro/" in got["msg"], got["msg"]
    assert "/ro')" in got["msg"], got["msg"]  # the mount point: a bind mount of the same device, found all the same
    assert "Mount that volume read-write" in got["msg"], got["msg"]


def test_read_only_storage_exits_2_through_run_main(refused_writes):
    assert refused_writes["ro/exit"] == 2


@pytest.mark.parametrize("op", ["write_bytes", "write_if_absent", "local_output", "upload_dir"])
def test_full_storage_is_a_clear_error_naming_the_path(refused_writes, op):
    got = refused_writes[f"full/{op}"]
    assert got["storage"], got
    msg = got["msg"]
    assert "no space left on device" in msg and "/full/" in msg, msg  # the path, though the OSError had none
    assert "free of 256.0 KiB on the file system mounted at" in msg and "/full')" in msg, msg
    assert "Free space there" in msg, msg
    if op != "local_output":  # what was being written, when storage knows it
        assert "writing 585.9 KiB" in msg, msg
    if op == "local_output":  # pyarrow's own error: the staging folder and the output are named for it
        assert "local_output(" in msg and "/full/out" in msg and ".out.partial-" in msg, msg
    assert refused_writes["full/left"] == []  # no temp file, staging folder or lock file left behind


@pytest.mark.parametrize("op", ["write_bytes", "write_if_absent", "local_output", "upload_dir"])
def test_storage_without_permission_is_a_clear_error(refused_writes, op):
    if "denied/skipped" in refused_writes:
        pytest.skip(f"cannot run as another user here: {refused_writes['denied/skipped']}")
    got = refused_writes[f"denied/{op}"]
    assert got["storage"], got
    msg = got["msg"]
    assert "permission denied" in msg and "/locked/" in msg and "uid 65534" in msg, msg
    assert "Give that user write access to" in msg and "/locked'" in msg, msg


# -------------------------------------------------------------------------- refused writes (simulated)
# The same errors raised at the os-level calls storage makes (monkeypatched), so they are checked where
# mounts cannot be made too, and the publish step itself (renames) can be refused.

def _raiser(err: int, with_name: bool = True):
    import os

    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err), *( [str(args[0])] if with_name and args else []))

    return fail


def test_full_disk_on_write_is_a_clear_error_naming_the_path(tmp_path, monkeypatch):
    import errno
    import os

    monkeypatch.setattr(os, "fsync", _raiser(errno.ENOSPC, with_name=False))  # as a real full disk: no file name
    for call, what in ((storage.write_bytes, "write"), (storage.write_if_absent, "create-only write")):
        target = tmp_path / "data" / f"{what.replace(' ', '-')}.bin"
        with pytest.raises(StorageError) as e:
            call(str(target), b"x" * 1000)
        msg = str(e.value)
        assert msg.startswith(f"{what} {str(target)!r}: no space left on device on the device holding {str(target)!r}")
        assert "free of" in msg and "Free space there" in msg, msg
    assert leftovers(tmp_path) == []


def test_read_only_folder_is_a_clear_error(tmp_path, monkeypatch):
    import errno
    import os

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"f")
    monkeypatch.setattr(os, "mkdir", _raiser(errno.EROFS))
    with pytest.raises(StorageError, match=r"read-only file system.*Mount that volume read-write"):
        storage.write_bytes(str(tmp_path / "new" / "a.bin"), b"x")
    with pytest.raises(StorageError, match=r"upload_dir\(.*read-only file system"):
        storage.upload_dir(src, str(tmp_path / "elsewhere" / "up"))
    monkeypatch.undo()
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (_raiser(errno.EROFS)(path) if ".partial-" in str(path)
                                                          else real_open(path, *a, **k)))
    with pytest.raises(StorageError) as e:
        with storage.local_output(str(tmp_path / "out")):
            pytest.fail("the body must not run when the output cannot be staged")
    assert f"local_output({str(tmp_path / 'out')!r}): {str(tmp_path / 'out')!r} is on a read-only file system" in str(e.value)


def test_publish_refused_is_a_clear_error_and_marks_nothing(tmp_path, monkeypatch):
    import errno
    import os

    uri = str(tmp_path / "out")
    with pytest.raises(StorageError) as e:
        with storage.local_output(uri) as folder:
            (folder / "data.bin").write_bytes(b"d")
            artifacts.write_manifest(str(folder), {"kind": "k"})
            monkeypatch.setattr(os, "replace", _raiser(errno.EACCES))  # the renames into place are refused
    msg = str(e.value)
    assert f"publish local_output({uri!r}): permission denied on {uri!r}" in msg and "data.bin" in msg, msg
    assert "Give that user write access" in msg
    monkeypatch.undo()
    assert not artifacts.is_complete(uri) and leftovers(tmp_path) == []


def test_full_disk_in_local_output_body_names_the_output(tmp_path):
    import errno
    import os

    uri = str(tmp_path / "out")
    with pytest.raises(StorageError) as e:
        with storage.local_output(uri) as folder:
            (folder / "part-0.parquet").write_bytes(b"p")
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    msg = str(e.value)
    assert f"local_output({uri!r}): writing the output into its staging folder" in msg and ".out.partial-" in msg
    assert "no space left on device" in msg and "the temp folder" in msg, msg
    assert not artifacts.is_complete(uri) and leftovers(tmp_path) == []
    with pytest.raises(PermissionError):  # the body's own errors about other things pass through unchanged
        with storage.local_output(uri):
            raise PermissionError(errno.EACCES, "Permission denied", "/etc/some-input")
    assert leftovers(tmp_path) == []


def test_full_disk_on_copy_is_a_clear_error(tmp_path, monkeypatch):
    import errno
    import shutil

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.bin").write_bytes(b"f")
    monkeypatch.setattr(shutil, "copy2", _raiser(errno.ENOSPC, with_name=False))
    target = tmp_path / "up"
    with pytest.raises(StorageError) as e:
        storage.upload_dir(src, str(target))
    assert f"no space left on device on the device holding {str(target / 'sub' / 'f.bin')!r}" in str(e.value)
    with pytest.raises(StorageError, match="no space left on device"):
        storage.download_dir(str(src), tmp_path / "down")  # copytree would have hidden it in a shutil.Error
