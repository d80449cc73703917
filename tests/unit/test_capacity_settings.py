"""Capacity settings: host-derived defaults, and a bad value stops start-up naming its variable."""
from __future__ import annotations

import os

import pytest

from config import load_settings
from sandbox.admission import Capacity
from sandbox.errors import ConfigError


def test_node_capacity_defaults_come_from_the_host(tmp_path) -> None:
    s = load_settings({"SANDBOX_WORK_DIR": str(tmp_path / "not-yet")})
    assert s.node_cpu == len(os.sched_getaffinity(0))
    with open("/proc/meminfo", encoding="ascii") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert total // 2 <= s.node_memory_bytes < total
    st = os.statvfs(tmp_path)  # the nearest existing parent of the work dir
    assert 0 < s.node_disk_bytes <= st.f_blocks * st.f_frsize
    assert (s.cpu_overcommit, s.node_max_sandboxes) == (4.0, 64)


def test_explicit_capacity_and_the_uid_range_cap() -> None:
    s = load_settings({"SANDBOX_NODE_CPU": "1500m", "SANDBOX_NODE_MEMORY": "2Gi", "SANDBOX_NODE_DISK": "10Gi",
                       "SANDBOX_CPU_OVERCOMMIT": "2", "SANDBOX_NODE_MAX_SANDBOXES": "100", "SANDBOX_UID_COUNT": "10"})
    assert Capacity.of(s) == Capacity(cpu=3.0, memory_bytes=2 << 30, disk_bytes=10 << 30, max_sandboxes=10)


@pytest.mark.parametrize(("env", "variable"), [
    ({"SANDBOX_NODE_CPU": "lots"}, "SANDBOX_NODE_CPU"),
    ({"SANDBOX_NODE_CPU": "0"}, "SANDBOX_NODE_CPU"),
    ({"SANDBOX_NODE_MEMORY": "-1Gi"}, "SANDBOX_NODE_MEMORY"),
    ({"SANDBOX_NODE_DISK": "a lot"}, "SANDBOX_NODE_DISK"),
    ({"SANDBOX_CPU_OVERCOMMIT": "0"}, "SANDBOX_CPU_OVERCOMMIT"),
    ({"SANDBOX_CPU_OVERCOMMIT": "nan"}, "SANDBOX_CPU_OVERCOMMIT"),
    ({"SANDBOX_NODE_MAX_SANDBOXES": "0"}, "SANDBOX_NODE_MAX_SANDBOXES"),
])
def test_bad_capacity_settings_stop_start_up_naming_the_variable(env, variable) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert err.value.variable == variable


def test_the_worker_is_one_threaded_process_sized_by_admission_and_drains_in_priority_order() -> None:
    import celeryconfig

    assert celeryconfig.worker_pool == "threads"
    assert celeryconfig.worker_concurrency == celeryconfig._settings.node_max_sandboxes + 16
    assert celeryconfig.broker_transport_options["queue_order_strategy"] == "priority"
    assert celeryconfig.task_acks_late is True


def test_create_in_submit_is_on_by_default_and_a_bad_value_names_its_variable() -> None:
    assert load_settings({}).create_in_submit is True
    assert load_settings({"SANDBOX_CREATE_IN_SUBMIT": "false"}).create_in_submit is False
    with pytest.raises(ConfigError) as e:
        load_settings({"SANDBOX_CREATE_IN_SUBMIT": "sometimes"})
    assert e.value.variable == "SANDBOX_CREATE_IN_SUBMIT"
