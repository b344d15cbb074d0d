"""A fault-injecting HTTP proxy for S3 tests: a real socket server on 127.0.0.1 (a free port) in front of an
upstream S3 endpoint (moto's server). It answers a fraction of requests with S3's own retryable errors (409
ConditionalRequestConflict, 500 InternalError, 503 ServiceUnavailable, 503 SlowDown), resets some connections
(mid-request-body, or after forwarding so the write may have landed), delays others, and passes the rest through.

    with FaultProxy(s3_server, seed=1, error_rate=0.3) as proxy:
        cfg = StorageConfig(root="s3://bucket/x", s3_endpoint=proxy.url)
        ...
        proxy.set_rates(error_rate=0, reset_rate=0, delay_rate=0)    # healed
    proxy.counts                                                     # Counter of what it did, by kind

409 is injected only on conditional writes (a PUT or POST with If-None-Match or If-Match), the only requests S3
answers with ConditionalRequestConflict. Conditional writes are forwarded upstream one at a time: S3 decides
them atomically, while moto checks and writes in two steps that its threads can interleave.
"""
from __future__ import annotations

import collections
import http.client
import random
import socket
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ERRORS = {   # kind: (status, S3 error code, message)
    "409": (409, "ConditionalRequestConflict",
            "A conflicting conditional operation is currently in progress against this resource. Please try again."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "SlowDown": (503, "SlowDown", "Please reduce your request rate."),
}
# Headers that describe one hop, not the message: the proxy frames each hop itself.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "expect", "content-length"}


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0, error_rate: float = 0.1, reset_rate: float = 0.03,
                 delay_rate: float = 0.1, max_delay_s: float = 0.2,
                 methods: tuple[str, ...] = ("PUT", "GET", "HEAD", "DELETE", "POST")) -> None:
        parsed = urlparse(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.error_rate, self.reset_rate, self.delay_rate = error_rate, reset_rate, delay_rate
        self.max_delay_s = max_delay_s
        self.methods = tuple(m.upper() for m in methods)
        self.counts: collections.Counter = collections.Counter()
        self.url = ""
        # Two streams: which fault each request gets depends only on the seed and the request's rank among
        # the requests that can be faulted, whatever the details (delays, how a reset happens) drew meanwhile.
        self._rng = random.Random(seed)
        self._detail_rng = random.Random(seed + 1_000_003)
        self._lock = threading.Lock()              # guards the rates, the random streams and the counts
        self._conditional_writes = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        if self._server is not None:
            return self
        handler = type("BoundHandler", (_Handler,), {"proxy": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fault-proxy-{self._server.server_address[1]}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()                 # no new connections
        server.close_open_connections()   # wakes handler threads idling on keep-alive connections
        server.server_close()             # joins the handler threads
        self._thread.join()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_rates(self, *, error_rate: float | None = None, reset_rate: float | None = None,
                  delay_rate: float | None = None) -> None:
        with self._lock:
            if error_rate is not None:
                self.error_rate = error_rate
            if reset_rate is not None:
                self.reset_rate = reset_rate
            if delay_rate is not None:
                self.delay_rate = delay_rate

    # -- decisions (a seed replays the same sequence of faults) --------------------------------------
    def _decide(self, method: str, conditional_write: bool) -> str:
        with self._lock:
            kind = "passed"
            if method in self.methods:
                r = self._rng.random()
                if r < self.error_rate:
                    kind = self._rng.choice(["409", "500", "503", "SlowDown"] if conditional_write
                                            else ["500", "503", "SlowDown"])
                elif r < self.error_rate + self.reset_rate:
                    kind = "reset"
                elif r < self.error_rate + self.reset_rate + self.delay_rate:
                    kind = "delay"
            self.counts[kind] += 1
            return kind

    def _random(self) -> float:
        with self._lock:
            return self._detail_rng.random()


class _Server(ThreadingHTTPServer):
    daemon_threads = False       # server_close() joins every handler thread: nothing outlives stop()
    block_on_close = True

    def __init__(self, *args, **kwargs) -> None:
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_open_connections(self) -> None:
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        pass                     # a client that went away mid-exchange is part of the game here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive, as botocore and aws-sdk-cpp use it
    timeout = 60                       # an idle client connection is dropped after this
    proxy: FaultProxy

    def log_message(self, format, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        try:
            super().finish()
        except OSError:
            pass

    def do_ANY(self) -> None:
        method = self.command
        conditional_write = method in ("PUT", "POST") and ("If-None-Match" in self.headers
                                                           or "If-Match" in self.headers)
        kind = self.proxy._decide(method, conditional_write)
        if kind == "reset":
            return self._reset(conditional_write)
        body = self._read_body()
        if body is None:
            return
        if kind in ERRORS:
            return self._send_error(*ERRORS[kind])
        if kind == "delay":
            time.sleep(self.proxy._random() * self.proxy.max_delay_s)
        response = self._forward(body, conditional_write)
        if response is None:
            self._send_error(502, "InternalError", "The proxy could not reach the upstream endpoint.")
        else:
            self._send(*response)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = do_ANY

    # -- request bodies (Content-Length or chunked; 100-continue is answered by BaseHTTPRequestHandler) ----
    def _has_body(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower() or \
            int(self.headers.get("Content-Length") or 0) > 0

    def _read_body(self, limit: int | None = None) -> bytes | None:
        """The whole request body (or its first `limit` bytes); None if the client went away."""
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return self._read_chunked(limit)
            want = int(self.headers.get("Content-Length") or 0)
            want = want if limit is None else min(want, limit)
            data = self.rfile.read(want) if want else b""
            if len(data) < want:
                self.close_connection = True
                return None
            return data
        except (OSError, ValueError):
            self.close_connection = True
            return None

    def _read_chunked(self, limit: int | None) -> bytes | None:
        parts, total = [], 0
        while True:
            size = int(self.rfile.readline(65537).split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass                                   # trailer fields, if any
                return b"".join(parts)
            if limit is not None and total + size > limit:
                parts.append(self.rfile.read(limit - total))
                return b"".join(parts)
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                self.close_connection = True
                return None
            parts.append(chunk)
            total += size
            self.rfile.readline(65537)                     # the CRLF after each chunk

    # -- upstream ------------------------------------------------------------------------------------
    def _forward(self, body: bytes, conditional_write: bool):
        """(status, reason, headers, body) from upstream, or None if it cannot be reached."""
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
        if body or self.command in ("PUT", "POST"):
            headers.append(("Content-Length", str(len(body))))
        lock = self.proxy._conditional_writes if conditional_write else _NO_LOCK
        with lock:
            for attempt in range(2):
                reused = self.upstream is not None
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
                try:
                    self.upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in headers:
                        self.upstream.putheader(k, v)
                    self.upstream.endheaders(body or None)
                    response = self.upstream.getresponse()
                    data = response.read()
                    if response.will_close:
                        self.upstream.close()
                        self.upstream = None
                    return response.status, response.reason, response.getheaders(), data
                except (http.client.HTTPException, OSError):
                    self.upstream.close()
                    self.upstream = None
                    # a kept-alive upstream connection the server had already closed: once more, fresh
                    if not reused or attempt:
                        return None
        return None

    # -- responses -----------------------------------------------------------------------------------
    def _send(self, status: int, reason: str, headers, body: bytes, *, cut: bool = False) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        if self.command == "HEAD":           # a HEAD answer describes the object's length without a body
            length = next((v for k, v in headers if k.lower() == "content-length"), None)
            if length is not None:
                self.send_header("Content-Length", length)
            body = b""
        elif status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        if cut:                              # a reset mid-response: the head, maybe half the body, then gone
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            return
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _send_error(self, status: int, code: str, message: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>{request_id}</RequestId><HostId>fault-proxy</HostId></Error>").encode()
        self._send(status, http.client.responses.get(status, ""), [
            ("Content-Type", "application/xml"), ("x-amz-request-id", request_id)], body)

    def _reset(self, conditional_write: bool) -> None:
        """Close the client connection abruptly: mid-body without forwarding (nothing landed), or after
        forwarding (the request took effect upstream) before or during the response."""
        rng = self.proxy._random
        try:
            if self._has_body() and rng() < 0.4:
                length = int(self.headers.get("Content-Length") or 0)
                self._read_body(limit=length // 2 if length else 16)
            else:
                body = self._read_body()
                if body is not None and rng() < 0.7:
                    response = self._forward(body, conditional_write)
                    if response is not None and rng() < 0.5:
                        self._send(*response, cut=True)
                        self.wfile.flush()
        except OSError:
            pass
        self._abort(rst=rng() < 0.5)

    def _abort(self, *, rst: bool) -> None:
        self.close_connection = True
        if rst:                              # SO_LINGER 0: close() sends RST, as a crashed peer's kernel would
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            except OSError:
                pass


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_LOCK = _NoLock()
