"""Dotfiles among a job's own files do not configure the tools it runs (curl, wget, git)."""
from __future__ import annotations

import io
from dataclasses import replace

from sandbox.policy import Policy
from tests.support.services import require

from tests.integration.test_local_runtime import make_spec


def run_with_files(rt, argv: list[str], files: dict[str, bytes]) -> bytes:  # noqa: ANN001
    spec = make_spec(argv)
    handle = rt.create(spec, "h")
    for path, content in files.items():
        rt.put_file(handle, path, io.BytesIO(content), 0o644)
    result = rt.execute(handle, spec, lambda stream, chunk: None)
    assert result.outcome in ("succeeded", "failed"), result
    return rt.logs(handle)["stdout"].read()


def test_a_planted_curlrc_is_not_read(runtime, settings) -> None:
    require("curl")
    policy = Policy(replace(settings, allowed_commands=("curl",)))
    argv = list(policy.check_command("curl -s http://example.invalid/"))  # no network: the fetch fails
    rc = {".curlrc": b'write-out = "PLANTED"\n'}
    assert argv[:2] == ["/usr/bin/curl", "-q"]
    assert b"PLANTED" not in run_with_files(runtime, argv, rc)
    # The same file without the policy's -q is read: the check above can fail.
    assert b"PLANTED" in run_with_files(runtime, [argv[0]] + argv[2:], rc)


def test_git_runs_with_hooks_and_system_config_pointed_at_nothing(runtime) -> None:
    require("git")
    out = run_with_files(runtime, ["/usr/bin/git", "config", "--get", "core.hooksPath"],
                         {".gitconfig": b"[core]\n\thooksPath = /workspace/hooks\n"})
    assert out == b"/dev/null\n"
