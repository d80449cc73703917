"""The node's HTTP endpoint: /metrics for Prometheus, /healthz for a supervisor's liveness probe."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("sandbox.observability")


class Liveness:
    """What /healthz answers: alive once the worker is consuming, not while it shuts down."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.started_at = time.time()
        self.consuming = False
        self.stopping = False

    def state(self) -> tuple[int, dict[str, Any]]:
        ok = self.consuming and not self.stopping
        return (200 if ok else 503), {
            "status": "ok" if ok else ("stopping" if self.stopping else "starting"),
            "node": self.node, "pid": os.getpid(), "uptime_s": round(time.time() - self.started_at, 3)}


def _handler(registry: CollectorRegistry, liveness: Liveness) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz":
                code, body = liveness.state()
                self._send(code, "application/json", json.dumps(body).encode())
            else:
                self._send(404, "text/plain", b"not found: try /metrics or /healthz\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # scrapes every few seconds are not news
            return

    return Handler


def serve(host: str, port: int, liveness: Liveness, registry: CollectorRegistry = REGISTRY) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; returns the server (its port, for port 0)."""
    server = ThreadingHTTPServer((host, port), _handler(registry, liveness))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, liveness on /healthz", host, server.server_address[1])
    return server
