"""gs:// storage against fake-gcs-server: healthy, behind a fault-injecting proxy, and with the server killed."""
from __future__ import annotations

import hashlib
import json
import random
import threading
from pathlib import Path

import pytest

from components.common import artifacts, storage
from components.common.storage import gcs
from components.common.artifacts import IncompleteArtifactError
from components.common.storage import StorageError

pytestmark = pytest.mark.gcs


def make_tree(root: Path, n: int = 20, seed: int = 0) -> dict[str, bytes]:
    """~20 files, a few hundred KB in all, in nested folders (incl. an empty file and odd names)."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for i in range(n):
        depth = i % 4
        rel = "/".join([f"d{j}" for j in range(depth)] + [f"file {i}.bin" if i % 7 == 3 else f"f{i}.bin"])
        size = 0 if i == 5 else rng.randint(1_000, 30_000)
        files[rel] = rng.randbytes(size)
    files["config.json"] = json.dumps({"a": 1}).encode()
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------ healthy

def test_read_write_exists_list(gcs_bucket):
    base = f"gs://{gcs_bucket}/run1"
    storage.write_text(storage.join(base, "a.txt"), "hello")
    storage.write_bytes(storage.join(base, "sub/b.bin"), b"\x00\x01")
    assert storage.read_text(f"{base}/a.txt") == "hello"
    assert storage.read_bytes(f"{base}/sub/b.bin") == b"\x00\x01"
    assert storage.exists(f"{base}/a.txt") and storage.exists(base) and storage.exists(f"{base}/sub")
    assert not storage.exists(f"{base}/nope") and not storage.exists(f"gs://{gcs_bucket}/run")
    assert storage.list_files(base) == [f"{base}/a.txt", f"{base}/sub/b.bin"]
    assert storage.list_files(f"gs://{gcs_bucket}/run") == []  # a prefix of a name is not a folder
    storage.write_text(f"{base}/a.txt", "again")  # overwrite
    assert storage.read_text(f"{base}/a.txt") == "again"
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_bytes(f"{base}/nope")


def test_delete_is_folder_exact(gcs_bucket):
    for name in ("run1/a", "run1/b/c", "run10/a", "run1", "single"):
        storage.write_text(f"gs://{gcs_bucket}/{name}", name)
    storage.delete(f"gs://{gcs_bucket}/run1")
    storage.delete(f"gs://{gcs_bucket}/single")
    assert storage.list_files(f"gs://{gcs_bucket}") == [f"gs://{gcs_bucket}/run10/a"]
    storage.delete(f"gs://{gcs_bucket}/run1")  # nothing there: fine
    with pytest.raises(StorageError, match="refusing"):
        storage.delete(f"gs://{gcs_bucket}")


def test_missing_bucket_is_a_clear_error(gcs_bucket, tmp_path):
    uri = "gs://no-such-bucket-xyz/data/file.txt"
    for call in (lambda: storage.read_bytes(uri), lambda: storage.write_bytes(uri, b"x"),
                 lambda: storage.list_files("gs://no-such-bucket-xyz/data"), lambda: storage.exists(uri),
                 lambda: storage.write_if_absent(uri, b"x"), lambda: artifacts.is_complete("gs://no-such-bucket-xyz/a")):
        with pytest.raises(storage.BucketNotFoundError) as e:
            call()
        assert "no-such-bucket-xyz" in str(e.value) and "does not exist" in str(e.value)
        assert "buckets create" in str(e.value)
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="no-such-bucket-xyz.*does not exist"):
        storage.upload_dir(tmp_path, "gs://no-such-bucket-xyz/tree")
    with pytest.raises(StorageError, match="does not exist"):
        with storage.local_output("gs://no-such-bucket-xyz/out"):
            pytest.fail("body must not run when the output bucket is missing")


def test_write_if_absent_race_exactly_one_wins(gcs_bucket):
    uri = f"gs://{gcs_bucket}/registry/v1/claim"
    barrier = threading.Barrier(8)
    results: dict[int, bool] = {}

    def claim(i: int) -> None:
        barrier.wait()
        results[i] = storage.write_if_absent(uri, f"writer {i}".encode())

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(results) == 8 and len(winners) == 1
    assert storage.read_text(uri) == f"writer {winners[0]}"


def test_tree_round_trip_and_local_input(gcs_bucket, tmp_path):
    files = make_tree(tmp_path / "src")
    uri = f"gs://{gcs_bucket}/models/m1"
    storage.upload_dir(tmp_path / "src", uri, exclude=("config.json",))
    expected = {k: v for k, v in files.items() if k != "config.json"}
    assert len(storage.list_files(uri)) == len(expected)
    assert read_tree(storage.download_dir(uri, tmp_path / "dst")) == expected
    with storage.local_input(uri) as folder:
        assert read_tree(folder) == expected
        kept = folder
    assert not kept.exists()  # temp download removed
    with storage.local_input(f"{uri}/f4.bin") as f:
        assert f.read_bytes() == files["f4.bin"] and f.name == "f4.bin"
    with pytest.raises(FileNotFoundError):
        with storage.local_input(f"gs://{gcs_bucket}/models/none"):
            pass
    with pytest.raises(FileNotFoundError):
        storage.download_dir(f"gs://{gcs_bucket}/models/none", tmp_path / "x")


def test_download_files(gcs_bucket, tmp_path, monkeypatch):
    files = make_tree(tmp_path / "src")
    uri = f"gs://{gcs_bucket}/ds"
    storage.upload_dir(tmp_path / "src", uri)
    wanted = ["d0/d1/f2.bin", "config.json", "d0/d1/d2/file 3.bin", "d0/f1.bin"]
    from google.cloud.storage import transfer_manager
    batches = []
    real = transfer_manager.download_many
    monkeypatch.setattr(transfer_manager, "download_many",
                        lambda pairs, *a, **k: (batches.append(len(pairs)), real(pairs, *a, **k))[1])
    got = storage.download_files([f"{uri}/{rel}" for rel in wanted], tmp_path / "dl")
    assert got == [tmp_path / "dl" / rel for rel in wanted]  # relative to gs://.../ds, in the order given
    assert [p.read_bytes() for p in got] == [files[rel] for rel in wanted]
    assert batches == [len(wanted)]  # one parallel transfer for all of them
    one = storage.download_files([f"{uri}/d0/d1/d2/file 3.bin"], tmp_path / "one")
    assert one == [tmp_path / "one" / "file 3.bin"] and one[0].read_bytes() == files["d0/d1/d2/file 3.bin"]
    # Files in two buckets: each keeps its bucket as the first folder.
    other = f"test-other-{gcs_bucket[-6:]}"
    gcs.client().create_bucket(other)
    storage.write_bytes(f"gs://{other}/x/y.bin", b"y")
    two = storage.download_files([f"{uri}/config.json", f"gs://{other}/x/y.bin"], tmp_path / "two")
    assert two == [tmp_path / "two" / gcs_bucket / "ds/config.json", tmp_path / "two" / other / "x/y.bin"]
    assert two[1].read_bytes() == b"y"
    with pytest.raises(FileNotFoundError, match=f"gs://{gcs_bucket}/ds/nope does not exist"):
        storage.download_files([f"{uri}/config.json", f"{uri}/nope"], tmp_path / "missing")
    with pytest.raises(storage.BucketNotFoundError, match="no-such-bucket-xyz"):
        storage.download_files(["gs://no-such-bucket-xyz/ds/a"], tmp_path / "nobucket")
    with pytest.raises(StorageError, match="names a folder"):
        storage.download_files([f"{uri}/d0/"], tmp_path / "folder")


def test_large_file_resumable_upload_round_trip(gcs_bucket, tmp_path):
    data = random.Random(1).randbytes(gcs.MULTIPART_LIMIT + 123)  # over 8 MiB: resumable upload path
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.safetensors").write_bytes(data)
    storage.upload_dir(tmp_path / "src", f"gs://{gcs_bucket}/big")
    out = storage.download_dir(f"gs://{gcs_bucket}/big", tmp_path / "dst")
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).digest() == hashlib.sha256(data).digest()


@pytest.mark.parametrize("faulty", [False, True])
def test_sliced_download_of_large_objects(gcs_emulator, gcs_bucket, tmp_path, monkeypatch, faulty, request):
    monkeypatch.setenv("VLMTUNE_GCS_SLICED_MIN_BYTES", str(1024 * 1024))
    monkeypatch.setenv("VLMTUNE_GCS_SLICE_BYTES", str(256 * 1024))
    rng = random.Random(3)
    files = {"model.safetensors": rng.randbytes(3 * 1024 * 1024 + 17), "sub/shard-2.bin": rng.randbytes(1024 * 1024),
             "config.json": b"{}"}
    for rel, data in files.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(data)
    storage.upload_dir(tmp_path / "src", f"gs://{gcs_bucket}/m")
    if faulty:
        proxy = request.getfixturevalue("gcs_fault_proxy")
        proxy.set_rates(**FLAKY)
        proxy.inject("corrupt", path_contains="alt=media")  # one bad slice: whole-object crc32c catches it
    from google.cloud.storage import transfer_manager
    sliced = []
    real = transfer_manager.download_chunks_concurrently
    monkeypatch.setattr(transfer_manager, "download_chunks_concurrently",
                        lambda blob, *a, **k: (sliced.append(blob.name), real(blob, *a, **k))[1])
    assert read_tree(storage.download_dir(f"gs://{gcs_bucket}/m", tmp_path / "dst")) == files
    assert {"m/model.safetensors", "m/sub/shard-2.bin"} == set(sliced)
    if faulty:
        assert proxy.faults["corrupt"] == 1 and len(sliced) == 3  # the corrupted object was fetched again


def test_local_output_publishes_manifest_last(gcs_bucket):
    uri = f"gs://{gcs_bucket}/artifacts/ds1"
    with storage.local_output(uri) as folder:
        make_tree(folder, n=5)
        artifacts.write_manifest(str(folder), {"kind": "dataset", "rows": 5})
        assert not storage.exists(uri)  # nothing published while the body runs
    assert artifacts.read_manifest(uri, kind="dataset")["rows"] == 5
    assert len(storage.list_files(uri)) == 7
    meta = gcs.client().bucket(gcs_bucket).get_blob("artifacts/ds1/manifest.json").metadata
    assert gcs.WRITER_TOKEN_KEY in meta  # written create-only


def test_local_output_body_raises_publishes_nothing(gcs_bucket):
    uri = f"gs://{gcs_bucket}/artifacts/ds2"
    with pytest.raises(ValueError):
        with storage.local_output(uri) as folder:
            make_tree(folder, n=5)
            artifacts.write_manifest(str(folder), {"kind": "dataset"})
            raise ValueError("step crashed")
    assert storage.list_files(uri) == [] and not artifacts.is_complete(uri)
    with pytest.raises(IncompleteArtifactError, match="did not finish"):
        artifacts.read_manifest(uri)


def test_local_output_rerun_clears_stale_manifest_first(gcs_bucket):
    uri = f"gs://{gcs_bucket}/artifacts/ds3"
    with storage.local_output(uri) as folder:
        (folder / "data").write_text("v1")
        artifacts.write_manifest(str(folder), {"kind": "dataset", "v": 1})
    with pytest.raises(RuntimeError):
        with storage.local_output(uri) as folder:
            assert not artifacts.is_complete(uri)  # old manifest no longer vouches for the folder
            raise RuntimeError("second run crashed")
    assert not artifacts.is_complete(uri)


def test_local_output_refuses_marker_written_meanwhile(gcs_bucket):
    uri = f"gs://{gcs_bucket}/artifacts/ds4"
    with pytest.raises(StorageError, match="appeared while local_output"):
        with storage.local_output(uri) as folder:
            (folder / "data").write_text("mine")
            artifacts.write_manifest(str(folder), {"writer": "me"})
            artifacts.write_manifest(uri, {"writer": "someone else"})  # a rival finished first
    assert artifacts.read_manifest(uri)["writer"] == "someone else"


# ------------------------------------------------------------------------------------------- faults

# 10% of requests fail transiently, in every way the proxy knows (plus some slow ones).
FLAKY = {"reset": 0.02, "reset_after": 0.02, "503": 0.02, "429": 0.02, "truncate": 0.02}


def test_round_trip_survives_10_percent_transient_failures(gcs_fault_proxy, gcs_bucket, tmp_path, caplog):
    proxy = gcs_fault_proxy
    proxy.slow_s = 0.05
    proxy.set_rates(**FLAKY, slow=0.03)
    for kind in FLAKY:  # every kind at least once, whatever the dice say
        proxy.inject(kind)
    proxy.inject("corrupt", 2, path_contains="alt=media")  # checksum mismatch: only our rounds retry it
    files = make_tree(tmp_path / "src", n=20, seed=7)
    assert 200_000 < sum(map(len, files.values())) < 1_000_000
    base = f"gs://{gcs_bucket}/flaky"

    storage.upload_dir(tmp_path / "src", f"{base}/tree")
    assert read_tree(storage.download_dir(f"{base}/tree", tmp_path / "dst")) == files

    with storage.local_output(f"{base}/artifact") as folder:
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        artifacts.write_manifest(str(folder), {"kind": "model", "n": len(files)})
    assert artifacts.read_manifest(f"{base}/artifact", kind="model")["n"] == len(files)
    with storage.local_input(f"{base}/artifact") as folder:
        got = read_tree(folder)
    assert got.pop("manifest.json") and got == files

    proxy.inject("corrupt", path_contains="alt=media")
    assert storage.read_bytes(f"{base}/tree/f0.bin") == files["f0.bin"]  # re-read after a checksum mismatch
    for i in range(10):
        storage.write_text(f"{base}/single/{i}.txt", str(i))
        assert storage.read_text(f"{base}/single/{i}.txt") == str(i)
    assert storage.write_if_absent(f"{base}/claim", b"x") is True
    assert storage.write_if_absent(f"{base}/claim", b"y") is False
    storage.delete(f"{base}/single")
    assert storage.list_files(f"{base}/single") == []

    assert proxy.total_faults >= 10, proxy.faults  # the faults really happened, and were all absorbed
    assert set(proxy.faults) >= {*FLAKY, "corrupt"}, proxy.faults
    assert "failed transiently" in caplog.text  # our per-file rounds ran (corrupt downloads)


def test_download_files_survives_transient_failures(gcs_fault_proxy, gcs_bucket, tmp_path, caplog):
    files = make_tree(tmp_path / "src", n=20, seed=5)
    uri = f"gs://{gcs_bucket}/flaky-files"
    storage.upload_dir(tmp_path / "src", uri)
    gcs_fault_proxy.set_rates(**FLAKY)
    gcs_fault_proxy.inject("corrupt", 2, path_contains="alt=media")  # checksum mismatch: only our rounds retry it
    wanted = sorted(files)
    got = storage.download_files([f"{uri}/{rel}" for rel in wanted], tmp_path / "dl")
    assert [p.read_bytes() for p in got] == [files[rel] for rel in wanted]
    assert gcs_fault_proxy.faults["corrupt"] == 2
    assert "failed transiently" in caplog.text


def test_write_if_absent_recognises_its_own_lost_success(gcs_fault_proxy, gcs_bucket):
    """The create succeeds but its response is lost; the retry meets 412 on our own object: still a win."""
    uri = f"gs://{gcs_bucket}/registry/v7"
    gcs_fault_proxy.inject("reset_after", method="POST", path_contains="/upload/")
    assert storage.write_if_absent(uri, b"mine") is True
    assert gcs_fault_proxy.faults["reset_after"] == 1
    gcs_fault_proxy.inject("reset_after", method="POST", path_contains="/upload/")
    assert storage.write_if_absent(uri, b"rival") is False  # a rival's lost success is not ours
    assert storage.read_bytes(uri) == b"mine"


def test_stalled_request_times_out_and_is_retried(gcs_fault_proxy, gcs_bucket, monkeypatch):
    monkeypatch.setenv("VLMTUNE_GCS_TIMEOUT_S", "0.3")
    gcs_fault_proxy.slow_s = 1.0
    uri = f"gs://{gcs_bucket}/stall/a.txt"
    gcs_fault_proxy.inject("slow", method="POST")
    assert storage.write_if_absent(uri, b"a") is True  # the stalled create landed late: still recognised as ours
    gcs_fault_proxy.inject("slow", method="GET")
    assert storage.read_bytes(uri) == b"a"
    assert gcs_fault_proxy.faults["slow"] == 2


def test_write_if_absent_race_through_faulty_proxy(gcs_fault_proxy, gcs_bucket):
    gcs_fault_proxy.set_rates(reset_after=0.2, **{"503": 0.1})
    for k in range(3):
        uri = f"gs://{gcs_bucket}/claims/{k}"
        barrier = threading.Barrier(2)
        results = []

        def claim(i: int) -> None:
            barrier.wait()
            results.append(storage.write_if_absent(uri, f"w{i}".encode()))

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False, True]


def test_storage_dying_mid_write_marks_nothing_complete(gcs_fault_proxy, gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTUNE_GCS_RETRY_DEADLINE_S", "1.5")
    uri = f"gs://{gcs_bucket}/artifacts/dying"
    gcs_fault_proxy.set_rates(slow=1.0)  # serialise a little so the cut lands mid-upload
    gcs_fault_proxy.slow_s = 0.01
    with pytest.raises(StorageError, match="still failed after retrying"):
        with storage.local_output(uri) as folder:
            make_tree(folder, n=20)
            artifacts.write_manifest(str(folder), {"kind": "model"})
            gcs_fault_proxy.fail_all_after(8, kind="503")
    gcs_fault_proxy.heal()
    written = storage.list_files(uri)
    assert 0 < len(written) < 21  # it really died mid-write
    assert f"{uri}/manifest.json" not in written
    assert not artifacts.is_complete(uri)
    with pytest.raises(IncompleteArtifactError):
        artifacts.read_manifest(uri)


WRITER = """
import sys
from pathlib import Path
from components.common import artifacts, storage
with storage.local_output(sys.argv[1]) as folder:
    for i in range(40):
        (folder / f"shard-{i:03d}.bin").write_bytes(bytes([i]) * 20_000)
    artifacts.write_manifest(str(folder), {"kind": "dataset"})
"""


def test_writer_killed_mid_upload_marks_nothing_complete(gcs_fault_proxy, gcs_bucket, tmp_path):
    """The step's process dies (SIGKILL, e.g. pre-emption) while uploading: no manifest, folder not trusted."""
    import os
    import signal
    import subprocess
    import sys

    uri = f"gs://{gcs_bucket}/artifacts/preempted"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, uri], cwd=Path(__file__).resolve().parents[4],
                            env={**os.environ, "VLMTUNE_GCS_MAX_WORKERS": "2", "TMPDIR": str(tmp_path)})
    uploads = []

    def on_request(seq: int) -> None:
        uploads.append(seq)
        if len(uploads) == 12:  # a few requests into the upload of 40 files
            proc.send_signal(signal.SIGKILL)

    gcs_fault_proxy.on_request = on_request
    gcs_fault_proxy.slow_s = 0.02
    gcs_fault_proxy.set_rates(slow=1.0)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    gcs_fault_proxy.on_request = None
    gcs_fault_proxy.heal()
    written = storage.list_files(uri)
    assert 0 < len(written) < 41 and f"{uri}/manifest.json" not in written
    assert not artifacts.is_complete(uri)
    with pytest.raises(IncompleteArtifactError):
        artifacts.read_manifest(uri)


def test_emulator_killed_mid_write_marks_nothing_complete(tmp_path, monkeypatch):
    from tests.fault_proxy import FaultProxy
    from tests.fixtures_gcs import FAST_RETRY_ENV, start_fake_gcs

    for k, v in FAST_RETRY_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("VLMTUNE_GCS_RETRY_DEADLINE_S", "1.5")
    emulator = start_fake_gcs(tmp_path / "gcs-data")
    proxy = FaultProxy(emulator.url)
    try:
        proxy.start()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        gcs.client().create_bucket("killed")
        uri = "gs://killed/artifacts/model"
        kill_at = {"n": None}

        def on_request(seq: int) -> None:
            if kill_at["n"] is not None and seq >= kill_at["n"] and emulator.proc is not None:
                emulator.kill()  # SIGKILL: the storage service dies with uploads in flight

        proxy.on_request = on_request
        with pytest.raises(StorageError):
            with storage.local_output(uri) as folder:
                make_tree(folder, n=20)
                artifacts.write_manifest(str(folder), {"kind": "model"})
                kill_at["n"] = proxy.requests + 10
        proxy.on_request = None
        emulator.start()  # same port, same data folder: what survived the crash
        try:
            written = storage.list_files(uri)
        except storage.BucketNotFoundError:
            # Seen once in CI: the emulator had not flushed the bucket itself to disk when it was killed, so
            # nothing survived. Nothing can then be marked complete either; the rest needs a bucket to ask.
            pytest.skip("the killed emulator lost the whole bucket; no partial folder to inspect")
        assert f"{uri}/manifest.json" not in written
        assert 0 < len(written) < 21
        assert not artifacts.is_complete(uri)
        with pytest.raises(IncompleteArtifactError, match="did not finish"):
            artifacts.read_manifest(uri)
    finally:
        proxy.stop()
        emulator.kill()


# ------------------------------------------------------------------------------------ dead endpoint

DEAD_DEADLINE_S = 1.0
#: What a failing operation may take beyond its deadline: the last backoff/request is cut at the deadline, then
#: the error is built (a second or so of slack for a loaded 2-core machine).
DEAD_MARGIN_S = 1.5


@pytest.fixture
def dead_endpoint(tmp_path, monkeypatch):
    """A private emulator behind the fault proxy, holding a 20-file tree at gs://dead/tree; ``kill(mode)`` makes
    the endpoint dead: "killed" (the emulator SIGKILLed: the proxy answers 502) or "blackhole" (connections are
    accepted, requests never answered). The default backoff and per-request timeout (60 s), 2 parallel
    transfers: with per-file deadlines the 20 files would need ~10 deadlines one after the other."""
    from tests.fault_proxy import FaultProxy
    from tests.fixtures_gcs import start_fake_gcs

    for k in ("VLMTUNE_GCS_RETRY_INITIAL_S", "VLMTUNE_GCS_RETRY_MAX_S", "VLMTUNE_GCS_TIMEOUT_S"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("VLMTUNE_GCS_RETRY_DEADLINE_S", str(DEAD_DEADLINE_S))
    monkeypatch.setenv("VLMTUNE_GCS_MAX_WORKERS", "2")
    emulator = start_fake_gcs()
    proxy = FaultProxy(emulator.url).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    gcs.client.cache_clear()
    gcs.client().create_bucket("dead")
    files = make_tree(tmp_path / "src", n=20)
    storage.upload_dir(tmp_path / "src", "gs://dead/tree")

    def kill(mode: str) -> None:
        if mode == "killed":
            emulator.kill()
        else:
            proxy.slow_s = 30.0  # far past the deadline and its margin
            proxy.set_rates(slow=1.0)

    try:
        yield {"src": tmp_path / "src", "files": files, "kill": kill, "proxy": proxy}
    finally:
        proxy.stop()
        emulator.kill()
        gcs.client.cache_clear()


def _fails_within_deadline(call, op_and_uri: str) -> tuple[float, str]:
    import time

    started = time.monotonic()
    with pytest.raises(StorageError) as e:
        call()
    took = time.monotonic() - started
    msg = str(e.value)
    assert took < DEAD_DEADLINE_S + DEAD_MARGIN_S, f"{op_and_uri} took {took:.1f}s: {msg}"
    assert took > DEAD_DEADLINE_S * 0.9, f"{op_and_uri} gave up after {took:.1f}s, before its deadline: {msg}"
    assert f"VLMTUNE_GCS_RETRY_DEADLINE_S={DEAD_DEADLINE_S:g}" in msg and op_and_uri in msg, msg
    assert "raise VLMTUNE_GCS_RETRY_DEADLINE_S" in msg, msg  # the fix is named
    return took, msg


@pytest.mark.parametrize("mode", ["killed", "blackhole"])
def test_dead_endpoint_fails_each_operation_within_one_deadline(dead_endpoint, tmp_path, mode):
    """Every operation on a dead endpoint fails after one deadline, however many files (and requests) it has;
    a blackhole too (each request's timeout is what is left of the deadline, not VLMTUNE_GCS_TIMEOUT_S)."""
    dead_endpoint["kill"](mode)
    names = sorted(dead_endpoint["files"])
    _, msg = _fails_within_deadline(lambda: storage.upload_dir(dead_endpoint["src"], "gs://dead/up"),
                                    "upload gs://dead/up")
    assert "21 of 21 files still failed" in msg, msg
    _, msg = _fails_within_deadline(
        lambda: storage.download_files([f"gs://dead/tree/{n}" for n in names], tmp_path / "dl"),
        "download 21 files like gs://dead/tree/")
    assert "21 of 21 files still failed" in msg, msg
    if mode == "blackhole":
        return  # the rest waits the same way: once is enough to show the cap on request timeouts

    def use_input() -> None:
        with storage.local_input("gs://dead/tree"):
            pytest.fail("no input: the body must not run")

    _fails_within_deadline(lambda: storage.download_dir("gs://dead/tree", tmp_path / "dd"), "download gs://dead/tree")
    _fails_within_deadline(lambda: storage.delete("gs://dead/tree"), "delete gs://dead/tree")
    _fails_within_deadline(use_input, "download gs://dead/tree")


def test_local_output_publish_on_a_dead_endpoint_fails_within_one_deadline(dead_endpoint):
    """The endpoint dies while the body runs: publishing 21 files and the marker shares one deadline, and the
    time the body took is not counted."""
    import time

    def publish() -> None:
        with storage.local_output("gs://dead/out") as folder:
            make_tree(folder, n=20)
            artifacts.write_manifest(str(folder), {"kind": "model"})
            time.sleep(DEAD_DEADLINE_S)  # a body longer than the deadline: not part of the operation
            dead_endpoint["kill"]("killed")

    started = time.monotonic()
    with pytest.raises(StorageError) as e:
        publish()
    took = time.monotonic() - started - DEAD_DEADLINE_S
    assert DEAD_DEADLINE_S * 0.9 < took < DEAD_DEADLINE_S + DEAD_MARGIN_S, (took, str(e.value))
    assert "publish gs://dead/out" in str(e.value), str(e.value)
    assert f"VLMTUNE_GCS_RETRY_DEADLINE_S={DEAD_DEADLINE_S:g}" in str(e.value), str(e.value)


def test_deadline_is_renewed_by_progress(gcs_fault_proxy, gcs_bucket, tmp_path, monkeypatch):
    """A healthy transfer longer than the deadline does not fail at its first transient error: each request
    that succeeds renews the operation's deadline (it counts time without progress)."""
    import time

    monkeypatch.setenv("VLMTUNE_GCS_RETRY_DEADLINE_S", "1.0")
    monkeypatch.setenv("VLMTUNE_GCS_MAX_WORKERS", "2")
    make_tree(tmp_path / "src", n=20)
    gcs_fault_proxy.slow_s = 0.15
    gcs_fault_proxy.set_rates(slow=1.0)  # 21 uploads, two at a time: ~1.6 s, longer than the deadline

    def late_errors(seq: int) -> None:
        if seq == 15:
            gcs_fault_proxy.inject("503", 2)

    gcs_fault_proxy.on_request = late_errors
    started = time.monotonic()
    storage.upload_dir(tmp_path / "src", f"gs://{gcs_bucket}/long")
    assert time.monotonic() - started > 1.0 and gcs_fault_proxy.faults["503"] == 2
    gcs_fault_proxy.heal()
    assert read_tree(storage.download_dir(f"gs://{gcs_bucket}/long", tmp_path / "dst")) == read_tree(tmp_path / "src")


def test_rerun_removes_the_local_staging_of_a_killed_gs_writer(gcs_bucket, tmp_path, monkeypatch):
    """A gs:// output is staged in the temp folder; a writer killed there leaves its folder, which the next
    writer of the same URI removes (as next to a local output: tests/.../test_staging.py)."""
    import signal
    import tempfile

    from tests.components.common.storage.test_staging import partial, start_writer

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    uri = f"gs://{gcs_bucket}/artifacts/staged"
    killed, folder, _ = start_writer(uri, tmp_path, "killed", env={"TMPDIR": str(tmp)})
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert folder.parent == tmp and folder.name.startswith("vlmtune-out-") and len(list(folder.iterdir())) == 5
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    other = f"gs://{gcs_bucket}/artifacts/other"
    with storage.local_output(other) as f:  # another output's writer leaves it alone
        (f / "x").write_text("x")
    assert folder.is_dir()
    with storage.local_output(uri) as f:
        (f / "x").write_text("x")
        artifacts.write_manifest(str(f), {"kind": "k"})
    assert artifacts.is_complete(uri) and partial(tmp, "vlmtune-out-") == []
