"""The agent's token check, its settings, the machine's environment and what its image must hold."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from config import load_settings
from sandbox.agent import protocol
from sandbox.agent.client import AgentClient
from sandbox.agent.protocol import machine_env, token_digest, token_matches
from sandbox.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-agent-token"


@pytest.mark.parametrize(("header", "ok"), [
    (f"Bearer {TOKEN}", True), (f"bearer {TOKEN}", True), (f"Bearer  {TOKEN} ", True),
    (None, False), ("", False), ("Bearer", False), ("Bearer ", False), (f"Basic {TOKEN}", False),
    (f"Bearer {TOKEN}x", False), (f"Bearer {TOKEN[:-1]}", False), (TOKEN, False),
])
def test_token_check(header: str | None, ok: bool) -> None:
    assert token_matches(header, token_digest(TOKEN)) is ok


def test_no_expected_token_refuses_everything() -> None:
    assert not token_matches(f"Bearer {TOKEN}", "")


def test_token_compare_is_constant_time_whatever_the_length(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given tokens of any length, the comparison is hmac.compare_digest over equal-length digests,
    # so neither the content nor the length of a guess changes how long it takes.
    seen: list[tuple[int, int]] = []
    real = protocol.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(protocol.hmac, "compare_digest", spy)
    for guess in ("x", TOKEN, TOKEN * 50):
        token_matches(f"Bearer {guess}", token_digest(TOKEN))
    assert seen == [(64, 64)] * 3


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "[fdaa:0:1::3]:8080", "fly-local-6pn:8080", "localhost:0"])
def test_agent_listen_accepts_one_interface(listen: str) -> None:
    assert load_settings({"SANDBOX_AGENT_LISTEN": listen}).agent_listen == listen


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "[::]:8080", ":8080", "fdaa::3:8080", "host", "host:99999",
                                    "host:http"])
def test_agent_listen_refuses_all_interfaces_and_nonsense(listen: str) -> None:
    with pytest.raises(ConfigError) as bad:
        load_settings({"SANDBOX_AGENT_LISTEN": listen})
    assert bad.value.variable == "SANDBOX_AGENT_LISTEN"


def test_agent_defaults_and_bad_digest() -> None:
    s = load_settings({})
    assert (s.agent_listen, s.agent_keepalive_s, s.agent_token) == ("fly-local-6pn:8080", 5.0, "")
    with pytest.raises(ConfigError, match="SANDBOX_AGENT_TOKEN_SHA256"):
        load_settings({"SANDBOX_AGENT_TOKEN_SHA256": "not-hex"})
    assert load_settings({}).redacted()["SANDBOX_AGENT_TOKEN"] == ""
    assert load_settings({"SANDBOX_AGENT_TOKEN": TOKEN}).redacted()["SANDBOX_AGENT_TOKEN"] == "***"


def test_machine_env_carries_limits_and_no_secret() -> None:
    secrets = {"SANDBOX_REDIS_URL": "redis://:redispass@10.0.0.1:6379/0", "SANDBOX_CLOUDFLARE_ACCESS_KEY": "AKIDSECRET",
               "SANDBOX_CLOUDFLARE_SECRET_KEY": "R2SECRET", "SANDBOX_FLY_API_TOKEN": "FlyV1 flysecret",
               "SANDBOX_WEBHOOK_SECRET": "hooksecret", "SANDBOX_MAX_LOG_BYTES": "2Mi", "SANDBOX_MAX_OUTPUT_FILES": "7"}
    worker = load_settings(secrets)
    env = machine_env(worker, TOKEN, "job-1", listen="[fdaa::3]:8080")
    text = json.dumps(env)
    for secret in ("redispass", "AKIDSECRET", "R2SECRET", "flysecret", "hooksecret", TOKEN):
        assert secret not in text
    assert env["SANDBOX_AGENT_TOKEN_SHA256"] == token_digest(TOKEN) and env["SANDBOX_AGENT_JOB_ID"] == "job-1"
    inside = load_settings(env)  # the machine's own settings parse from it
    assert (inside.max_log_bytes, inside.max_output_files, inside.runtime) == (2 << 20, 7, "local")
    assert inside.agent_listen == "[fdaa::3]:8080"


def test_client_never_shows_its_token() -> None:
    c = AgentClient("http://[fdaa::3]:8080", TOKEN)
    assert TOKEN not in repr(c) and TOKEN not in str(vars(c).get("base_url"))


def test_the_image_installs_everything_the_agent_imports() -> None:
    # The machine image installs deploy/fly/requirements-agent.txt only: every third-party module
    # the agent loads must come from a distribution pinned there, at requirements.txt's version.
    code = ("import sys, json; import sandbox.agent.__main__, sandbox.agent.server, sandbox.runtimes.seccomp as s;"
            "import pyseccomp;"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                                       text=True).stdout)
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "deploy/fly/requirements-agent.txt").read_text(), re.M))
    pinned = {name.lower().replace("_", "-") for name in pins}
    dists = packages_distributions()
    for module in set(loaded) - {"sandbox", "config", "__main__", "_distutils_hack"}:
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        assert names & pinned, f"{module} (from {names}) is not in deploy/fly/requirements-agent.txt"
    assert "celery" not in loaded and "redis" not in loaded and "boto3" not in loaded
    runtime_pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M))
    for name, version in pins.items():
        assert runtime_pins.get(name, version) == version, f"{name}: agent pins {version}, workers {runtime_pins[name]}"
    subprocess.run(["sh", "-n", str(ROOT / "deploy/fly/entrypoint.sh")], check=True)  # syntax only: never run here
    dockerfile = (ROOT / "deploy/fly/Dockerfile").read_text()
    for package in ("bubblewrap", "util-linux", "e2fsprogs", "python3", "libseccomp2"):
        assert package in dockerfile


def test_the_agent_makes_no_spare_images(monkeypatch) -> None:
    # A machine runs one job: spares made for a next create would be copied only to be thrown away.
    from sandbox.agent.__main__ import _settings

    monkeypatch.setenv("SANDBOX_AGENT_TOKEN", "t" * 32)
    monkeypatch.setenv("SANDBOX_SPARE_IMAGES", "2")
    settings, _ = _settings()
    assert settings.spare_images == 0 and settings.runtime == "local"
