"""`python -m sandbox validate` reads the raw bytes exactly as sandbox.submit does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def validate(tmp_path: Path, raw: bytes, commands: str = "ls,cat,python3") -> subprocess.CompletedProcess:
    job = tmp_path / "job.json"
    job.write_bytes(raw)
    env = {**os.environ, "SANDBOX_ALLOWED_COMMANDS": commands}
    return subprocess.run([sys.executable, "-m", "sandbox", "validate", str(job)], cwd=ROOT, env=env,
                          capture_output=True, timeout=60)


def test_valid_job_exits_0(tmp_path: Path) -> None:
    done = validate(tmp_path, (ROOT / "examples" / "hello.json").read_bytes())
    assert done.returncode == 0, done.stdout
    assert json.loads(done.stdout)["argv"][0] == "/usr/bin/python3"


def test_duplicate_keys_in_raw_bytes_are_rejected_with_exit_2(tmp_path: Path) -> None:
    done = validate(tmp_path, b'{"command": "ls", "command": "cat /etc/shadow"}')
    assert done.returncode == 2
    error = json.loads(done.stdout)["error"]
    assert error["field"] == "/command" and error["rule"] == "duplicate_key"


def test_command_not_on_the_list_is_rejected_naming_the_field(tmp_path: Path) -> None:
    done = validate(tmp_path, b'{"command": "python3 -c 1"}', commands="ls")
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"]["field"] == "/command"
