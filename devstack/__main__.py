"""The local stack for a developer: Redis, SeaweedFS (S3), and the Procfile's worker, beat, flower.

    python -m devstack up                        # run until Ctrl-C; submit from another terminal
    python -m devstack run examples/hello.json   # up, submit one job, show it, stop
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from devstack.processes import ROOT, RedisServer, free_port, stop_process
from devstack.seaweed import SeaweedServer
VAR = ROOT / "var"


def procfile() -> dict[str, str]:
    """name -> command line, from the Procfile that production uses too."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if line.strip() and not line.startswith("#"))


class Stack:
    """Everything `make up` and `make run` start, and stop again in reverse order."""

    def __init__(self, redis_port: int) -> None:
        VAR.mkdir(exist_ok=True)
        self.redis = RedisServer(VAR)
        self.redis.port, self.redis.url = redis_port, f"redis://127.0.0.1:{redis_port}/0"
        self.s3 = SeaweedServer(VAR / "s3")
        self.flower_auth = f"admin:{secrets.token_urlsafe(12)}"
        self.procs: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        (VAR / "work").mkdir(exist_ok=True)
        return {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "SANDBOX_REDIS_URL": self.redis.url,
            **self.s3.env(),
            "SANDBOX_WORK_DIR": str(VAR / "work"),
            # The local stack's example is a Python program, so python3 is on its command list.
            "SANDBOX_ALLOWED_COMMANDS": os.environ.get("SANDBOX_ALLOWED_COMMANDS", "ls,cat,grep,curl,wget,python3"),
            "FLOWER_BASIC_AUTH": self.flower_auth,
        }

    def up(self) -> None:
        say("starting redis on " + self.redis.url)
        self.redis.start()
        # as production's Redis should be (python -m sandbox health checks it): AOF on, noeviction
        redis.Redis.from_url(self.redis.url).config_set("appendonly", "yes")
        say("starting SeaweedFS (S3) ...")
        self.s3.start()
        say(f"S3 endpoint {self.s3.endpoint}, bucket {self.s3.bucket}")
        env = self.env()
        for name, command in procfile().items():
            log = open(VAR / f"{name}.log", "ab")
            self.procs.append(subprocess.Popen(["bash", "-c", f"exec {command.strip()}"], cwd=ROOT, env=env,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            say(f"started {name} (log: var/{name}.log)")
        self._wait_for_worker(env)
        say(f"Flower: http://127.0.0.1:{os.environ.get('FLOWER_PORT', '5555')}/flower  (user:password {self.flower_auth})")
        metrics = f"http://127.0.0.1:{os.environ.get('SANDBOX_METRICS_PORT', '9540')}"
        # the CLI's health check needs this run's S3 keys too: keep them where only root reads them
        env_file = VAR / "devstack.env"
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items() if k.startswith("SANDBOX_")))
        say(f"worker metrics: {metrics}/metrics  liveness: {metrics}/healthz")
        self._show_health(env)
        say("health again: (set -a; . var/devstack.env; .venv/bin/python -m sandbox health)")

    def _show_health(self, env: dict[str, str]) -> None:
        """`python -m sandbox health` once beat has recorded its start (until then its sweeps look missed)."""
        from sandbox.nodes import BEAT_STARTED_KEY

        client, deadline = redis.Redis.from_url(env["SANDBOX_REDIS_URL"]), time.monotonic() + 30
        while client.get(BEAT_STARTED_KEY) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        done = subprocess.run([sys.executable, "-m", "sandbox", "health"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        for line in (done.stdout or done.stderr).splitlines():
            say(f"health: {line}")

    def _wait_for_worker(self, env: dict[str, str]) -> None:
        from celery import Celery

        app = Celery(broker=env["SANDBOX_REDIS_URL"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if app.control.ping(timeout=0.5):
                say("worker ready")
                return
        raise SystemExit("the worker did not start: see var/worker.log")

    def down(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, timeout_s=20)
        self.s3.stop()
        self.redis.stop()
        say("stack stopped")


def say(text: str) -> None:
    print(f"[devstack] {text}", file=sys.stderr, flush=True)


def run_example(stack: Stack, job_file: Path) -> int:
    """Submit one job through the CLI exactly as a user would, then show its logs and record."""
    env = stack.env()
    done = subprocess.run([sys.executable, "-m", "sandbox", "submit", str(job_file), "--wait", "--timeout", "300"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE)
    record = json.loads(done.stdout or b"{}")
    print(json.dumps(record, indent=2))
    for entry in (e for e in record.get("logs", []) if e["key"].endswith(".log")):
        body = urllib.request.urlopen(entry["url"], timeout=10).read().decode(errors="replace")  # noqa: S310
        print(f"--- {entry['key']} (fetched through its presigned URL) ---\n{body}", end="")
    for entry in record.get("artifacts", []):
        print(f"--- artifact {entry['path']}: {entry['size']} bytes, download: {entry['url']}")
    print(f"job {record.get('id')} ended {record.get('status')}", file=sys.stderr)
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "run"])
    parser.add_argument("job", nargs="?", type=Path, default=ROOT / "examples" / "hello.json")
    args = parser.parse_args()
    port = 6379 if args.action == "up" else free_port()
    stack = Stack(redis_port=int(os.environ.get("DEVSTACK_REDIS_PORT", port)))
    # a closed terminal or a dropped SSH session (SIGHUP) stops the stack as ^C and SIGTERM do: its
    # processes run in sessions of their own and would otherwise outlive it
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        stack.up()
        if args.action == "run":
            return run_example(stack, args.job)
        say("stack is up; in another terminal: .venv/bin/python -m sandbox submit examples/hello.json --wait")
        while all(p.poll() is None for p in stack.procs):
            time.sleep(1)
        say("a process exited; stopping")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.down()


if __name__ == "__main__":
    sys.exit(main())
