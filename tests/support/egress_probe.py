"""Runs INSIDE a sandbox (system python3, standard library only): talks to the egress proxy and to
the network directly, and prints one JSON object of what happened. `python3 probe.py <case> [args]`."""
import json
import socket
import ssl
import sys
import time

PROXY = ("127.0.0.1", 3128)


def ask(request: bytes, timeout: float = 5.0) -> dict:
    """Send a raw request head to the proxy; the status code and X-Sandbox-Egress reason it answers."""
    s = socket.create_connection(PROXY, timeout=timeout)
    try:
        s.sendall(request)
        return parse(read_head(s))
    finally:
        s.close()


def read_head(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def parse(head: bytes) -> dict:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    out = {"status": int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None, "reason": None}
    for line in lines[1:]:
        if line.lower().startswith(b"x-sandbox-egress:"):
            out["reason"] = line.split(b":", 1)[1].strip().decode()
    return out


def connect_targets(targets: list) -> dict:
    return {t: ask(f"CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n".encode()) for t in targets}


def errno_of(fn) -> str:
    try:
        fn()
        return "ok"
    except OSError as e:
        return type(e).__name__ + ":" + str(e.errno)


def direct(address: str) -> dict:
    """Everything that must fail without the proxy: TCP, UDP, DNS to the upstream."""
    def tcp() -> None:
        socket.create_connection((address, 443), timeout=2).close()

    def udp() -> None:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03api\x04test\x00\x00\x01\x00\x01", (address, 53))
        u.settimeout(1)
        u.recv(512)

    def dns() -> None:
        socket.getaddrinfo("api.test", 443)

    return {"tcp": errno_of(tcp), "udp": errno_of(udp), "dns": errno_of(dns)}


def sni(host: str, server_name: str, cafile: str) -> dict:
    """CONNECT to `host` and then speak TLS naming `server_name`."""
    s = socket.create_connection(PROXY, timeout=5)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    status = parse(read_head(s))
    ctx = ssl.create_default_context(cafile=cafile)
    try:
        t = ctx.wrap_socket(s, server_hostname=server_name)
        t.sendall(f"GET /hello HTTP/1.1\r\nHost: {server_name}\r\n\r\n".encode())
        return {"connect": status, "tls": "ok", "body": t.recv(4096).decode(errors="replace")}
    except (OSError, ssl.SSLError) as e:
        return {"connect": status, "tls": type(e).__name__ + ": " + str(e)[:120]}


def keepalive(first_host: str, second_host: str, second_url_host: str) -> dict:
    """Two requests on one plain connection; the second may name another Host or URL."""
    s = socket.create_connection(PROXY, timeout=5)
    s.sendall(f"GET http://{first_host}/hello HTTP/1.1\r\nHost: {first_host}\r\n\r\n".encode())
    first, _, body = read_head(s).partition(b"\r\n\r\n")
    while b"\n" not in body:
        body += s.recv(4096)
    s.sendall(f"GET http://{second_url_host}/hello HTTP/1.1\r\nHost: {second_host}\r\n\r\n".encode())
    second = read_head(s)
    return {"first": parse(first), "first_body": body.decode(errors="replace"), "second": parse(second)}


def many(total: int, hold: int) -> dict:
    """`hold` tunnels held open (no ClientHello), then `total` connections in all; what each got."""
    held, answers = [], []
    for _ in range(hold):
        s = socket.create_connection(PROXY, timeout=5)
        s.sendall(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n")
        held.append(s)
    for s in held:
        answers.append(parse(read_head(s)))  # 200, or a 403 for those over the concurrency cap
    for s in held:
        s.close()
    time.sleep(0.5)  # the proxy sees the held tunnels end
    for _ in range(total - hold):
        try:
            answers.append(ask(b"CONNECT other.test:443 HTTP/1.1\r\nHost: other.test:443\r\n\r\n"))
        except ConnectionRefusedError:  # past the connection cap the proxy no longer listens
            answers.append({"status": "refused", "reason": None})
    counts: dict = {}
    for a in answers:
        key = f"{a['status']} {a['reason']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def never_read(host: str, size: int, seconds: float) -> dict:
    s = socket.create_connection(PROXY, timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(f"GET http://{host}/hold/{size} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    print("READY", flush=True)
    time.sleep(seconds)
    return {"held": True}


def download(url: str, count: int = 1) -> dict:
    """GET through the proxy with urllib (env proxy), `count` times; bytes or the error of each."""
    import urllib.request
    out = []
    for _ in range(count):
        try:
            with urllib.request.urlopen(url, timeout=20) as r:
                n = 0
                while True:
                    chunk = r.read(65536)
                    if not chunk:
                        break
                    n += len(chunk)
                out.append(n)
        except Exception as e:  # noqa: BLE001
            out.append(type(e).__name__ + ": " + str(e)[:100])
    return {"results": out}


def pip(index: str) -> dict:
    """`python3 -m pip download` from an index behind the proxy (the upstream serves no packages)."""
    import subprocess
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-d", "/tmp/pip",
                        "--index-url", index, "somepkg"], capture_output=True, text=True, timeout=60)
    return {"returncode": r.returncode, "output": (r.stdout + r.stderr)[-2000:]}


def listen(port: int, seconds: float) -> dict:
    """Listen on every address of the sandbox; count what arrives (nothing may)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(5)
    srv.settimeout(0.2)
    print("LISTENING", flush=True)
    accepted, deadline = 0, time.time() + seconds
    while time.time() < deadline:
        try:
            srv.accept()[0].close()
            accepted += 1
        except socket.timeout:
            pass
    return {"accepted": accepted}


def main() -> None:
    case, args = sys.argv[1], sys.argv[2:]
    if case == "connect":
        result = connect_targets(args)
    elif case == "direct":
        result = direct(args[0])
    elif case == "sni":
        result = sni(args[0], args[1], args[2])
    elif case == "keepalive":
        result = keepalive(*args)
    elif case == "many":
        result = many(int(args[0]), int(args[1]))
    elif case == "never_read":
        result = never_read(args[0], int(args[1]), float(args[2]))
    elif case == "download":
        result = download(args[0], int(args[1]) if len(args) > 1 else 1)
    elif case == "raw":  # hostile request heads, given as Python byte literals
        result = {a: ask(eval(a)) for a in args}  # noqa: S307 - the test's own literals, inside the sandbox
    elif case == "pip":
        result = pip(args[0])
    elif case == "listen":
        result = listen(int(args[0]), float(args[1]))
    elif case == "tcp":
        result = {"tcp": errno_of(lambda: socket.create_connection((args[0], int(args[1])), timeout=2).close())}
    else:
        raise SystemExit(f"unknown case {case}")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
