"""A forwarding HTTP proxy on 127.0.0.1 for tests: it records the absolute URL of each request
a client sends through it (as a client sends to a proxy), then forwards the request to that
URL (the fake API server) and relays the answer."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "transfer-encoding",
               "content-length", "proxy-authorization", "te", "trailers", "upgrade"}


@contextmanager
def forwarding_proxy() -> Iterator[tuple[str, list[str]]]:
    """Yields the proxy's URL (http://127.0.0.1:<port>) and the list of URLs it forwarded."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Keep test output clean."""

        def do_POST(self) -> None:
            seen.append(self.path)
            target = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream = http.client.HTTPConnection(target.hostname or "", target.port, timeout=30)
            try:
                upstream.request("POST", target.path + (f"?{target.query}" if target.query
                                                        else ""), body, headers)
                answer = upstream.getresponse()
                data = answer.read()
            finally:
                upstream.close()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fake-proxy", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
