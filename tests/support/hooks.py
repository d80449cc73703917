"""A webhook receiver on loopback: it keeps every POST and answers what the test's `answer` says.

One server shell for every webhook test; what a test's receiver checks (signatures, duplicates,
a failing first delivery) is its `answer`, and what it keeps beyond the POSTs is its own."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass(frozen=True)
class Post:
    headers: Message  # case-insensitive, as an HTTP server reads them
    body: bytes


class HookReceiver(ThreadingHTTPServer):
    """Serves from a thread of its own while in `with`; answers 204 unless `answer` says otherwise."""

    def __init__(self, answer: Callable[[Post], int] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer = answer or (lambda post: 204)
        self.posts: list[Post] = []
        # one POST at a time: an answer may depend on the ones before it (the first fails, a repeat is refused)
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> "HookReceiver":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: HookReceiver

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        post = Post(self.headers, self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        with self.server.lock:
            self.server.posts.append(post)
            status = self.server.answer(post)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None
