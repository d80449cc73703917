"""Settings: defaults as the seed has them, and every bad value stops start-up naming its variable."""
from __future__ import annotations

import pytest

from config import load_settings
from config.units import parse_cpu, parse_size
from sandbox.errors import ConfigError


def test_seed_defaults() -> None:
    s = load_settings({})
    assert s.default_cpu == 0.5
    assert s.default_memory_bytes == 512 * 2**20
    assert s.default_disk_bytes == 2**30
    assert s.default_timeout_s == 300
    assert s.allowed_commands == ("ls", "cat", "grep", "curl", "wget")
    assert s.fly_api_url == "https://api.machines.dev/v1"
    assert s.r2_bucket == "chronos-synapse"
    assert s.s3_endpoint == "https://.r2.cloudflarestorage.com"  # no account id set yet
    assert s.visibility_timeout_s > s.max_timeout_s


@pytest.mark.parametrize(("env", "variable"), [
    ({"SANDBOX_DEFAULT_MEMORY": "lots"}, "SANDBOX_DEFAULT_MEMORY"),
    ({"SANDBOX_DEFAULT_CPU": "-1"}, "SANDBOX_DEFAULT_CPU"),
    ({"SANDBOX_DEFAULT_CPU": "0"}, "SANDBOX_DEFAULT_CPU"),
    ({"SANDBOX_REDIS_URL": "http://localhost:6379"}, "SANDBOX_REDIS_URL"),
    ({"SANDBOX_REDIS_URL": "not a url"}, "SANDBOX_REDIS_URL"),
    ({"SANDBOX_DEFAULT_TIMEOUT": "nan"}, "SANDBOX_DEFAULT_TIMEOUT"),
    ({"SANDBOX_DEFAULT_TIMEOUT": "inf"}, "SANDBOX_DEFAULT_TIMEOUT"),
    ({"SANDBOX_BLOCKED_PORTS": "22,70000"}, "SANDBOX_BLOCKED_PORTS"),
    ({"SANDBOX_RUNTIME": "docker"}, "SANDBOX_RUNTIME"),
    ({"SANDBOX_PRESIGN_TTL": "604801"}, "SANDBOX_PRESIGN_TTL"),
    ({"SANDBOX_DEFAULT_MEMORY": "8Gi"}, "SANDBOX_DEFAULT_MEMORY"),  # above SANDBOX_MAX_MEMORY
    ({"SANDBOX_RUNTIME": "fly"}, "SANDBOX_FLY_APP"),
    ({"SANDBOX_VISIBILITY_TIMEOUT": "600"}, "SANDBOX_VISIBILITY_TIMEOUT"),  # below max timeout + margin
    ({"SANDBOX_R2_SSE_C_KEY": "c2hvcnQ="}, "SANDBOX_R2_SSE_C_KEY"),
    ({"SANDBOX_R2_SSE_C_KEY": "not base64!"}, "SANDBOX_R2_SSE_C_KEY"),
    ({"SANDBOX_SPARE_IMAGES": "-1"}, "SANDBOX_SPARE_IMAGES"),
    ({"SANDBOX_SPARE_IMAGES": "many"}, "SANDBOX_SPARE_IMAGES"),
])
def test_bad_setting_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.variable == variable
    assert variable in str(caught.value)


def test_units() -> None:
    assert parse_size("512Mi") == 512 * 2**20
    assert parse_size("1Gi") == 2**30
    assert parse_size("1G") == 10**9
    assert parse_cpu("0.5") == 0.5
    assert parse_cpu("250m") == 0.25
    for bad in ("", "1.5.5", "-1Gi", "0", "1Qi", "1e9"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_secrets_are_masked() -> None:
    shown = load_settings({"SANDBOX_CLOUDFLARE_SECRET_KEY": "s3cr3t"}).redacted()
    assert shown["SANDBOX_CLOUDFLARE_SECRET_KEY"] == "***"
    assert "s3cr3t" not in repr(shown)


def test_sandbox_uid_range() -> None:
    s = load_settings({})
    assert (s.sandbox_uid, s.sandbox_uid_count) == (1000000, 1024)
    s = load_settings({"SANDBOX_UID": "200000", "SANDBOX_UID_COUNT": "1"})
    assert (s.sandbox_uid, s.sandbox_uid_count) == (200000, 1)
    assert load_settings({"SANDBOX_UID": str(2**31 - 10), "SANDBOX_UID_COUNT": "10"}).sandbox_uid_count == 10


@pytest.mark.parametrize("env,variable", [
    ({"SANDBOX_UID": "0"}, "SANDBOX_UID"),  # root is never a sandbox uid
    ({"SANDBOX_UID": "-5"}, "SANDBOX_UID"),
    ({"SANDBOX_UID": str(2**31)}, "SANDBOX_UID"),
    ({"SANDBOX_UID_COUNT": "0"}, "SANDBOX_UID_COUNT"),
    ({"SANDBOX_UID_COUNT": "many"}, "SANDBOX_UID_COUNT"),
    ({"SANDBOX_UID": str(2**31 - 10), "SANDBOX_UID_COUNT": "11"}, "SANDBOX_UID_COUNT"),  # ends at 2^31
])
def test_bad_sandbox_uid_range_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.variable == variable and variable in str(caught.value)


FLY_ENV = {"SANDBOX_RUNTIME": "fly", "SANDBOX_FLY_APP": "app", "SANDBOX_FLY_API_TOKEN": "t",
           "SANDBOX_FLY_IMAGE": "registry.fly.io/app:1", "SANDBOX_FLY_AGENT_SECRET": "s" * 32}


@pytest.mark.parametrize("missing", ["SANDBOX_FLY_APP", "SANDBOX_FLY_API_TOKEN", "SANDBOX_FLY_IMAGE",
                                     "SANDBOX_FLY_AGENT_SECRET"])
def test_the_fly_runtime_names_each_missing_setting(missing: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({k: v for k, v in FLY_ENV.items() if k != missing})
    assert caught.value.variable == missing


@pytest.mark.parametrize("env", [{"SANDBOX_FLY_REGIONS": "ams,FRA"}, {"SANDBOX_FLY_REGIONS": ""},
                                 {"SANDBOX_FLY_CPU_KIND": "dedicated"}, {"SANDBOX_FLY_AGENT_PORT": "0"},
                                 {"SANDBOX_FLY_START_TIMEOUT": "0"}, {"SANDBOX_FLY_AGENT_SECRET": "short"}])
def test_bad_fly_setting_names_its_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**FLY_ENV, **env})
    assert caught.value.variable == next(iter(env))


def test_the_fly_runtime_is_accepted_with_its_settings() -> None:
    s = load_settings({**FLY_ENV, "SANDBOX_FLY_REGIONS": "ams, fra"})
    assert s.runtime == "fly" and s.fly_regions == ("ams", "fra") and s.fly_cpu_kind == "shared"
    assert s.redacted()["SANDBOX_FLY_AGENT_SECRET"] == "***"


def test_reliability_defaults_and_bad_values_name_their_variable() -> None:
    s = load_settings({})
    assert (s.max_deliveries, s.heartbeat_interval_s, s.node_dead_after_s, s.stuck_sweep_interval_s) == (3, 10, 60, 15)
    assert s.require_durable_redis is False
    assert s.tombstone_ttl_s == 30 * 86400  # the longest artifact retention
    for env, variable in (({"SANDBOX_MAX_DELIVERIES": "0"}, "SANDBOX_MAX_DELIVERIES"),
                          ({"SANDBOX_REQUIRE_DURABLE_REDIS": "maybe"}, "SANDBOX_REQUIRE_DURABLE_REDIS"),
                          ({"SANDBOX_HEARTBEAT_INTERVAL": "-1"}, "SANDBOX_HEARTBEAT_INTERVAL"),
                          ({"SANDBOX_NODE_DEAD_AFTER": "15"}, "SANDBOX_NODE_DEAD_AFTER"),  # < 2 heartbeats
                          ({"SANDBOX_MAX_MESSAGE_BYTES": "big"}, "SANDBOX_MAX_MESSAGE_BYTES")):
        with pytest.raises(ConfigError) as e:
            load_settings(env)
        assert e.value.variable == variable
