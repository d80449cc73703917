"""python -m sandbox.agent: the main process of a job's Fly Machine (see docs/fly.md)."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

from config.settings import Settings, load_settings, split_host_port
from sandbox.agent.protocol import token_digest
from sandbox.agent.server import AgentServer
from sandbox.agent.service import Agent
from sandbox.errors import ConfigError, SandboxFailure
from sandbox.runtimes.local import LocalRuntime

log = logging.getLogger("sandbox.agent")
WATCH_INTERVAL_S = 1.0


def _settings() -> tuple[Settings, str]:
    # Inside the machine the job runs on the local runtime whatever the workers use. A machine runs
    # one job: spare images (made ahead for the next create) would be copied only to be thrown away.
    settings = load_settings({**os.environ, "SANDBOX_RUNTIME": "local", "SANDBOX_SPARE_IMAGES": "0"})
    digest = settings.agent_token_sha256 or (token_digest(settings.agent_token) if settings.agent_token else "")
    if not digest:
        raise ConfigError("SANDBOX_AGENT_TOKEN", "the agent needs SANDBOX_AGENT_TOKEN or SANDBOX_AGENT_TOKEN_SHA256")
    return settings, digest


def _watch(agent: Agent, server: AgentServer, settings: Settings, stop: threading.Event, why: list[str]) -> None:
    """End the agent (and so the machine) when no job claimed it in time or its job is past expiry."""
    while not stop.wait(WATCH_INTERVAL_S):
        unclaimed = agent.state == "idle" and time.time() - agent.started_at > settings.agent_unclaimed_exit_s
        expired = agent.handle is not None and time.time() > agent.handle.expires_at
        if unclaimed or expired:
            why.append("no job claimed the machine" if unclaimed else "the job is past its expiry")
            log.warning("agent exiting: %s", why[-1])
            server.shutdown()
            return


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings, digest = _settings()
        host, port = split_host_port(settings.agent_listen)
        runtime = LocalRuntime(settings)
    except (ConfigError, SandboxFailure) as e:
        print(f"sandbox-agent: {e}", file=sys.stderr)
        return 2
    os.environ.pop("SANDBOX_AGENT_TOKEN", None)  # no child process (mount, mkfs) inherits it
    agent = Agent(runtime, host=os.environ.get("FLY_MACHINE_ID") or settings.node_name,
                  job_id=settings.agent_job_id)
    server = AgentServer(host, port, agent, digest, settings.agent_keepalive_s)
    stop = threading.Event()
    why: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("agent stopping on signal %d", signum)
        why.append(f"signal {signal.Signals(signum).name}")
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() blocks this thread

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=_watch, args=(agent, server, settings, stop, why), daemon=True).start()
    bound_host, bound_port = server.server_address[:2]
    print(json.dumps({"event": "listening", "host": bound_host, "port": bound_port}), flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        stop.set()
        server.server_close()
        try:
            agent.shut_down(why[0] if why else "the agent stopped")  # in a VM the machine goes anyway
        except Exception:  # noqa: BLE001
            log.exception("could not destroy the sandbox on the way out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
