"""A fault-injecting HTTP proxy on loopback, for testing storage clients against an emulator.

Put it in front of fake-gcs-server and point ``STORAGE_EMULATOR_HOST`` at :attr:`FaultProxy.url`. Each
request is forwarded, or fails in one of these ways:

- ``"reset"``: the connection is dropped before the request reaches the server (nothing happened there);
- ``"reset_after"``: the request is forwarded and done by the server, then the connection is dropped before
  the response (the client cannot know it succeeded: the case that makes blind retries dangerous);
- ``"503"`` / ``"429"``: an error response with a GCS-style JSON body (the server sees nothing);
- ``"slow"``: forwarded after ``slow_s`` seconds;
- ``"truncate"``: forwarded, then the response is cut half-way through its body and the connection dropped;
- ``"corrupt"``: on object downloads (``alt=media``), one byte of the body is flipped (the client's checksum
  check must catch it: google-cloud-storage raises ``DataCorruption`` and does not retry it itself);
  other requests pass unharmed.

Faults are chosen per request with probabilities (``rates``), deterministically from ``seed`` and the
request itself (method, path, and how many times that request was seen), so thread scheduling does not change
which requests fail. ``max_faults`` bounds the total. On top: :meth:`inject` queues forced faults for the next
matching requests, and :meth:`fail_all_after` makes every request after the next N fail (a storage service
that dies mid-write); :meth:`heal` undoes both. ``on_request`` (optional) is called with each request's
sequence number before it is handled (e.g. to kill the emulator at the N-th request).

Upstream URLs in ``Location`` headers and JSON bodies are rewritten to the proxy's own, so resumable upload
sessions and media links also go through the proxy. Upstream connection failures become 502.
"""
from __future__ import annotations

import collections
import hashlib
import http.client
import json
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

FAULT_KINDS = ("reset", "reset_after", "503", "429", "slow", "truncate", "corrupt")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "content-length"}


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0, rates: dict[str, float] | None = None,
                 slow_s: float = 0.2, max_faults: int | None = None,
                 on_request: Callable[[int], None] | None = None):
        parts = urlsplit(upstream)
        self.upstream = f"{parts.scheme}://{parts.netloc}"
        self._up_host, self._up_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.seed = seed
        self.rates = dict(rates or {})
        unknown = set(self.rates) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        self.slow_s = slow_s
        self.max_faults = max_faults
        self.on_request = on_request
        self.lock = threading.Lock()
        self.requests = 0
        self.faults: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, path, outcome)
        self._seen: collections.Counter[tuple[str, str]] = collections.Counter()
        self._forced: list[tuple[str, str | None, str | None]] = []  # (kind, method, path substring)
        self._fail_after: int | None = None
        self._fail_kind = "reset"
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ control
    @property
    def url(self) -> str:
        assert self._server is not None, "proxy not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            pass

        Handler.proxy = proxy
        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_rates(self, **rates: float) -> None:
        with self.lock:
            self.rates = {k: v for k, v in rates.items() if v}

    def inject(self, kind: str, count: int = 1, *, method: str | None = None, path_contains: str | None = None) -> None:
        """Force ``kind`` on the next ``count`` requests matching ``method``/``path_contains``."""
        assert kind in FAULT_KINDS, kind
        with self.lock:
            self._forced.extend([(kind, method, path_contains)] * count)

    def fail_all_after(self, n: int, kind: str = "reset") -> None:
        """Let the next ``n`` requests through (subject to rates), then fail every request with ``kind``."""
        assert kind in ("reset", "503", "429"), kind
        with self.lock:
            self._fail_after = self.requests + n
            self._fail_kind = kind

    def heal(self) -> None:
        with self.lock:
            self._fail_after = None
            self._forced.clear()
            self.rates = {}

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())

    # --------------------------------------------------------------------------------------- decisions
    def _decide(self, method: str, path: str) -> tuple[int, str | None]:
        with self.lock:
            self.requests += 1
            seq = self.requests
            if self._fail_after is not None and seq > self._fail_after:
                kind: str | None = self._fail_kind
            else:
                kind = None
                for i, (k, m, p) in enumerate(self._forced):
                    if (m is None or m == method) and (p is None or p in path):
                        kind = k
                        del self._forced[i]
                        break
                if kind is None and self.rates and (self.max_faults is None or self.total_faults < self.max_faults):
                    key = (method, path)
                    self._seen[key] += 1
                    digest = hashlib.sha256(f"{self.seed}|{method}|{path}|{self._seen[key]}".encode()).digest()
                    x = random.Random(digest).random()
                    acc = 0.0
                    for k in FAULT_KINDS:
                        acc += self.rates.get(k, 0.0)
                        if x < acc:
                            kind = k
                            break
            if kind is not None:
                self.faults[kind] += 1
            self.log.append((method, path, kind or "ok"))
        return seq, kind

    def _rewrite(self, data: bytes) -> bytes:
        return data.replace(self.upstream.encode(), self.url.encode())


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys
        if isinstance(sys.exc_info()[1], OSError):  # the client hung up (it timed out or gave up): expected
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self): self._handle()
    def do_HEAD(self): self._handle()
    def do_POST(self): self._handle()
    def do_PUT(self): self._handle()
    def do_PATCH(self): self._handle()
    def do_DELETE(self): self._handle()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        # RST instead of FIN: the client sees "connection reset", as when a load balancer or server dies.
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if self.command != "HEAD" or body:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _error(self, status: int) -> None:
        reason = {503: "backendError", 429: "rateLimitExceeded", 502: "badGateway"}.get(status, "error")
        body = json.dumps({"error": {"code": status, "message": f"injected {status}",
                                     "errors": [{"reason": reason, "message": f"injected {status}"}]}}).encode()
        self._send(status, [("Content-Type", "application/json")], body)

    def _handle(self) -> None:
        proxy = self.proxy
        body = self._read_body()
        seq, kind = proxy._decide(self.command, self.path)
        if proxy.on_request is not None:
            proxy.on_request(seq)
        if kind == "reset":
            return self._reset()
        if kind in ("503", "429"):
            return self._error(int(kind))
        if kind == "slow":
            time.sleep(proxy.slow_s)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
        headers["Host"] = f"{proxy._up_host}:{proxy._up_port}"
        try:
            conn = http.client.HTTPConnection(proxy._up_host, proxy._up_port, timeout=30)
            try:
                conn.request(self.command, self.path, body=body if body or self.command in ("POST", "PUT", "PATCH") else None,
                             headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                resp_headers = resp.getheaders()
                status = resp.status
            finally:
                conn.close()
        except OSError:
            return self._error(502)
        if kind == "reset_after":
            return self._reset()
        if kind == "corrupt" and "alt=media" in self.path and data:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        out_headers = []
        for k, v in resp_headers:
            if k.lower() in _HOP_BY_HOP:
                continue
            if k.lower() == "location":
                v = v.replace(proxy.upstream, proxy.url)
            out_headers.append((k, v))
        ctype = dict((k.lower(), v) for k, v in resp_headers).get("content-type", "")
        if "json" in ctype and "alt=media" not in self.path:
            data = proxy._rewrite(data)
        if kind == "truncate" and len(data) > 1:
            self.send_response(status)
            for k, v in out_headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._reset()
        self._send(status, out_headers, data)
