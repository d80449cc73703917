"""`make dashboard`: a real run, scraped by a real Prometheus, drawn as the dashboard's panels.

Starts Redis, SeaweedFS, one worker (threads pool), Flower and Prometheus (scraping the worker every
2 s, with deploy/prometheus/alerts.yml loaded), sends a mixed workload of jobs (every ending), then
renders deploy/grafana/sandbox.json's panels from Prometheus into var/dashboard/index.html and takes
screenshots of it and of Flower's task list with headless Chromium into docs/img/.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis
from celery import Celery

from devstack.processes import ROOT, RedisServer, Worker, find_binary, free_port, stop_process
from devstack.render import render
from devstack.seaweed import SeaweedServer

OUT = ROOT / "var" / "dashboard"
IMG = ROOT / "docs" / "img"
ALLOC = "b = []\nfor _ in range(400):\n    b.append(bytearray(1 << 20))\n"
NOTE = ("Grafana is not packaged in Debian, so these are deploy/grafana/sandbox.json's own panels and queries, "
        "drawn as static SVG from a real Prometheus that scraped a real worker during `make dashboard` "
        "(a mixed workload of every job ending).")


def say(text: str) -> None:
    print(f"[dashboard] {text}", file=sys.stderr, flush=True)


def chromium(url: str, png: Path, width: int, height: int, profile: Path) -> None:
    """A screenshot with headless Chromium (flags as the project's machines need them)."""
    shutil.rmtree(profile, ignore_errors=True)
    profile.mkdir(parents=True)
    subprocess.run([find_binary("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
                    f"--window-size={width},{height}", "--virtual-time-budget=8000", f"--screenshot={png}", url],
                   check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Receiver(ThreadingHTTPServer):
    """A webhook receiver that accepts two deliveries in three and refuses the third (HTTP 410)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Answer)
        self.count = 0


class _Answer(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.count += 1
        self.send_response(410 if self.server.count % 3 == 0 else 204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


def workload(app: Celery, rounds: int, pause_s: float, hook_url: str) -> dict[str, int]:
    """Rounds of jobs of every ending; returns how many ended in each status."""
    ended: dict[str, int] = {}
    for n in range(rounds):
        jobs = [{"command": "ls", "callback_url": hook_url}] + [
            {"command": "python3 -c 'print(\"hello\")'"} for _ in range(3)] + [
            {"command": "ls -la"},
            {"command": "python3 -c 'import sys; sys.exit(3)'"},
            {"command": "sleep 30", "timeout": 1},
            {"command": "python3 alloc.py", "resources": {"memory": "64Mi"},
             "files": [{"path": "alloc.py", "content": ALLOC}]},
            {"command": "cat /etc/shadow; rm -rf /"},  # rejected: shell syntax
            {"command": "ls", "environment": {"LD_PRELOAD": "/tmp/x.so"}},  # rejected: loader variable
        ]
        if n % 2 == 0:  # error: prepare cannot find its input
            jobs.append({"command": "cat missing.txt", "files": [{"path": "missing.txt", "r2_key": "jobs/{id}/input/none"}]})
        results = []
        for job in jobs:
            job["id"] = f"dash-{n}-{secrets.token_hex(4)}"
            for f in job.get("files", []):
                if "r2_key" in f:
                    f["r2_key"] = f["r2_key"].format(id=job["id"])
            results.append(app.send_task("sandbox.submit", args=[json.dumps(job)], argsrepr=f"job={job['id']}"))
        if n % 3 == 1:
            victim = f"dash-cancel-{n}-{secrets.token_hex(4)}"
            pending = app.send_task("sandbox.submit", args=[json.dumps({"id": victim, "command": "sleep 60"})],
                                    argsrepr=f"job={victim}")
            time.sleep(1.5)
            app.send_task("sandbox.cancel", args=[victim]).get(timeout=60)
            results.append(pending)
        for result in results:
            status = result.get(timeout=180)["status"]
            ended[status] = ended.get(status, 0) + 1
        say(f"round {n + 1}/{rounds}: {ended}")
        time.sleep(pause_s)
    return ended


def prometheus_config(target: str, path: Path) -> None:
    path.write_text(json.dumps({
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "rule_files": [str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
        "scrape_configs": [{"job_name": "sandbox-worker", "static_configs": [{"targets": [target]}]}],
    }))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.dashboard", description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--pause", type=float, default=6.0, help="seconds between rounds")
    args = parser.parse_args()
    from sandbox.runtimes.diskimage import unmount
    unmount(str(OUT / "work" / "run"))  # the last run's tmpfs run dir (SANDBOX_RUN_DIR), or rmtree stops at it
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    IMG.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    redis_server, s3, worker = RedisServer(OUT), SeaweedServer(OUT / "s3"), None
    try:
        redis_server.start()
        redis.Redis.from_url(redis_server.url).config_set("appendonly", "yes")  # as production's should be
        s3.start()
        work = OUT / "work"
        work.mkdir(mode=0o711)
        work.chmod(0o711)
        env = {"SANDBOX_REDIS_URL": redis_server.url, **s3.env(), "SANDBOX_WORK_DIR": str(work),
               "SANDBOX_ALLOWED_COMMANDS": "ls,cat,grep,python3,sleep", "SANDBOX_DEFAULT_DISK": "64Mi",
               "SANDBOX_DEFAULT_MEMORY": "256Mi", "SANDBOX_LOG_FORMAT": "json",
               "SANDBOX_WEBHOOK_SECRET": secrets.token_hex(16), "SANDBOX_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
        app = Celery("dashboard", broker=redis_server.url, backend=redis_server.url)
        app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                        result_accept_content=["json"], task_default_queue="sandbox")
        worker = Worker(env, node="dash@host", log_path=OUT / "worker.log")
        worker.start(app)
        say(f"worker metrics at {worker.metrics_url}/metrics")
        flower_port, auth = free_port(), f"ops:{secrets.token_urlsafe(8)}"
        flower_cmd = [line.split(":", 1)[1] for line in (ROOT / "Procfile").read_text().splitlines()
                      if line.startswith("flower:")][0]
        procs.append(subprocess.Popen(
            ["bash", "-c", f"exec {flower_cmd.strip()}"], cwd=ROOT, start_new_session=True,
            env={**os.environ, **env, "FLOWER_PORT": str(flower_port), "FLOWER_BASIC_AUTH": auth,
                 "FLOWER_DB": str(OUT / "flower.db"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
            stdout=open(OUT / "flower.log", "ab"), stderr=subprocess.STDOUT))
        prom_port = free_port()
        prometheus_config(f"127.0.0.1:{worker.metrics_port}", OUT / "prometheus.yml")
        procs.append(subprocess.Popen(
            [find_binary("prometheus"), f"--config.file={OUT / 'prometheus.yml'}", f"--storage.tsdb.path={OUT / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"], start_new_session=True,
            stdout=open(OUT / "prometheus.log", "ab"), stderr=subprocess.STDOUT))
        prometheus = f"http://127.0.0.1:{prom_port}"
        time.sleep(6)  # Prometheus's first scrapes, Flower's event consumer
        start = time.time()
        hook = Receiver()
        threading.Thread(target=hook.serve_forever, daemon=True).start()
        ended = workload(app, args.rounds, args.pause, f"http://127.0.0.1:{hook.server_address[1]}/hook")
        time.sleep(6)  # the last scrapes
        end = time.time()
        say(f"jobs ended: {ended}")
        (OUT / "index.html").write_text(render(prometheus, ROOT / "deploy" / "grafana" / "sandbox.json", start - 10, end,
                                               NOTE + f" Jobs in this run: {json.dumps(ended, sort_keys=True)}."))
        chromium((OUT / "index.html").as_uri(), IMG / "dashboard.png", 1260, 2330, OUT / "chrome")
        user, password = auth.split(":", 1)
        flower = f"http://{user}:{password}@127.0.0.1:{flower_port}/flower"
        chromium(f"{flower}/tasks", IMG / "flower-tasks.png", 1900, 1000, OUT / "chrome")
        # one row per job: cleanup's result is how the job ended (the submit row is cleanup's, see docs)
        chromium(f"{flower}/tasks?name=sandbox.cleanup", IMG / "flower-jobs.png", 2200, 1000, OUT / "chrome")
        alerts = json.load(urllib.request.urlopen(f"{prometheus}/api/v1/alerts", timeout=10))["data"]["alerts"]  # noqa: S310
        say(f"alerts pending/firing in Prometheus: {sorted({a['labels']['alertname'] for a in alerts})}")
        say(f"wrote {OUT / 'index.html'} and the screenshots in {IMG}")
        return 0
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        if worker:
            worker.stop()
        s3.stop()
        redis_server.stop()


if __name__ == "__main__":
    sys.exit(main())
