"""A fault-injecting HTTP proxy in front of an S3 endpoint (the moto server), for tests.

Clients point ``AWS_ENDPOINT_URL`` at :attr:`FaultProxy.url`; every request is forwarded
to the real endpoint unless a fault applies. Faults, set by the test at any time:

* ``fail_first_gets``: the first N GETs of each object key (of the keys containing one of
  ``only_keys``, when set) answer 503 SlowDown, the throttling answer S3 gives (botocore,
  s3fs and the job's own retries have to absorb it);
* ``reset_every``: every k-th object GET has its connection reset without an answer;
* ``fail_keys``: object keys (substrings) whose GETs always answer 503 ServiceUnavailable;
* ``deny_gets``: every object GET answers 403 InvalidAccessKeyId (credentials revoked);
* ``down``: every request (listing included) answers 503 ServiceUnavailable, an outage;
  ``down_after_gets``: the outage starts by itself after that many object GETs.

``get_delay_s`` delays every forwarded object GET (so that concurrent readers overlap).
``injected`` counts the faults by kind, ``gets`` the object GETs seen, ``max_in_flight``
the most object GETs the proxy was serving at once.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
          '<RequestId>fault-proxy</RequestId></Error>')
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port or 80)
        self.fail_first_gets = 0
        self.only_keys: tuple[str, ...] = ()
        self.reset_every = 0
        self.fail_keys: tuple[str, ...] = ()
        self.deny_gets = False
        self.get_delay_s = 0.0
        self.down = False
        self.down_after_gets: int | None = None
        self.injected: Counter = Counter()
        self.gets = 0
        self.in_flight = self.max_in_flight = 0
        self._per_key: Counter = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        """No faults from now on; counters kept."""
        with self._lock:
            self.fail_first_gets = self.reset_every = 0
            self.only_keys = self.fail_keys = ()
            self.down, self.down_after_gets, self.deny_gets = False, None, False

    @staticmethod
    def is_object_get(method: str, path: str) -> bool:
        parts = urlsplit(path)
        return method == "GET" and "/" in parts.path.strip("/") and "list-type" not in parts.query

    def _track(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    # which fault (if any) a request meets
    def _fault(self, method: str, path: str) -> str | None:
        parts = urlsplit(path)
        is_object_get = self.is_object_get(method, path)
        with self._lock:
            if is_object_get:
                self.gets += 1
                if self.down_after_gets is not None and self.gets > self.down_after_gets:
                    self.down = True
            if self.down:
                fault = "down"
            elif not is_object_get:
                fault = None
            elif self.deny_gets:
                fault = "deny"
            elif any(k in parts.path for k in self.fail_keys):
                fault = "fail_key"
            else:
                self._per_key[parts.path] += 1
                chosen = not self.only_keys or any(k in parts.path for k in self.only_keys)
                if chosen and self._per_key[parts.path] <= self.fail_first_gets:
                    fault = "slowdown"
                elif self.reset_every and self.gets % self.reset_every == 0:
                    fault = "reset"
                else:
                    fault = None
            if fault:
                self.injected[fault] += 1
            return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, body: bytes, headers) -> None:
                self.send_response(status)
                length = str(len(body))
                for k, v in headers:
                    if k.lower() == "content-length" and self.command == "HEAD":
                        length = v  # a HEAD answer states the object's length, with no body
                    elif k.lower() not in _HOP_HEADERS:
                        self.send_header(k, v)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._fault(self.command, self.path)
                if fault == "reset":
                    # RST instead of FIN: the client sees "connection reset by peer"
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault:
                    status, code, message = {
                        "slowdown": (503, "SlowDown", "Please reduce your request rate."),
                        "deny": (403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist."),
                    }.get(fault, (503, "ServiceUnavailable", "Service is unable to handle request."))
                    err = _ERROR.format(code=code, message=message).encode()
                    self._answer(status, err, [("Content-Type", "application/xml")])
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                counted = proxy.is_object_get(self.command, self.path)
                if counted:
                    proxy._track(+1)
                    time.sleep(proxy.get_delay_s)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self._answer(resp.status, data, resp.getheaders())
                finally:
                    conn.close()
                    if counted:
                        proxy._track(-1)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

            def finish(self):
                try:
                    super().finish()
                except OSError:  # the socket was reset on purpose
                    pass

        return Handler
