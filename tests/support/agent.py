"""The real agent (python -m sandbox.agent) as a local process on a loopback port, for tests and fakes."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from devstack.processes import ROOT


class AgentProcess:
    """One agent process: started with `env` on top of this process's PATH, stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], log_path: Path | str, listen: str = "127.0.0.1:0") -> None:
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
                    "SANDBOX_AGENT_LISTEN": listen, **env}
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.port = 0
        self._log: IO[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> "AgentProcess":
        """Start it and wait for its `listening` line; RuntimeError (with its log) if it never comes."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "sandbox.agent"], cwd=str(ROOT), env=self.env,
                                     stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"agent did not start: {self.log()[-2000:]}")
        info = json.loads(line)
        self.port = int(info["port"])
        host = info["host"]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def peak_rss_bytes(self) -> int:
        """VmHWM: the most resident memory the agent ever had."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (the agent destroys its sandbox on the way out), SIGKILL if it hangs; its exit status."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def wait_exit(self, timeout_s: float) -> int | None:
        """The exit status once it ends on its own, or None if still running after `timeout_s`."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.proc.returncode
            time.sleep(0.1)
        return None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
