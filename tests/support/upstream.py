"""A test upstream for the egress proxy: plain HTTP on :80 and TLS on :443 (and :8443), run inside a
network namespace the test created. Run as `python -m tests.support.upstream CERT KEY`.

GET /hello       -> "hello <Host header>\n"
GET /bytes/<n>   -> n bytes (streamed)
GET /hold/<n>    -> n bytes, for a client that never reads (the server just blocks on send)
"""
from __future__ import annotations

import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so one connection can carry several requests

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/bytes/") or self.path.startswith("/hold/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = b"x" * 65536
            try:
                while n > 0:
                    self.wfile.write(block[:n])
                    n -= min(n, len(block))
            except OSError:
                pass
            return
        body = f"hello {self.headers.get('Host')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n)
        body = f"posted {len(data)}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6  # with V6ONLY off: IPv4 clients arrive as ::ffff:a.b.c.d

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve(port: int, context: ssl.SSLContext | None) -> ThreadingHTTPServer:
    server = DualStackServer(("::", port), Handler)
    server.daemon_threads = True
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    cert, key = sys.argv[1], sys.argv[2]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    serve(80, None)
    serve(443, context)
    serve(8443, context)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # UDP 53: a job's DNS must never get here
    sock.bind(("0.0.0.0", 53))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(2048)
        print(f"udp {peer[0]} {len(data)}", flush=True)


if __name__ == "__main__":
    main()
