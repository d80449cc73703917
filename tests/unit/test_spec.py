"""parse_job: defaults, units, maxima, strict JSON, the schema file, job_id_of and the stored form."""
from __future__ import annotations

import json
import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from config.settings import Settings, load_settings
from config.units import format_size, parse_cpu, parse_size
from sandbox.errors import JobRejected
from sandbox.spec import JOB_ID, JobSpec, job_id_of, job_schema, parse_job


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings({"SANDBOX_DEFAULT_MEMORY": "256Mi", "SANDBOX_DEFAULT_TIMEOUT": "60",
                          "SANDBOX_ALLOWED_HOSTS": "*.example.com", "SANDBOX_WEBHOOK_ALLOWED_HOSTS": "hooks.example.com"})


# --- units -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "size"), [
    ("512Mi", 512 * 2**20), ("1Gi", 2**30), ("1G", 10**9), ("100M", 10**8), ("1.5Ki", 1536), ("4096", 4096),
    ("1GiB", 2**30), ("2k", 2000),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "-1Mi", "0", "1 Gi", "1e3", "1Xi", "Mi", "0x10"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(("text", "cores"), [("0.5", 0.5), ("2", 2.0), ("500m", 0.5), ("1.25", 1.25)])
def test_parse_cpu(text: str, cores: float) -> None:
    assert parse_cpu(text) == cores


@pytest.mark.parametrize("text", ["-1", "0", "0m", "half", "1e1", "", "NaN", "inf"])
def test_parse_cpu_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu(text)


def test_format_size() -> None:
    assert (format_size(2**30), format_size(3 * 2**20), format_size(1000)) == ("1Gi", "3Mi", "1000")


# --- parse_job ---------------------------------------------------------------------------------

def test_defaults_come_from_settings(settings: Settings) -> None:
    spec = parse_job(b'{"command": "ls -l"}', settings)
    assert JOB_ID.fullmatch(spec.id)
    assert spec.timeout_s == 60.0
    assert (spec.resources.cpu, spec.resources.memory_bytes) == (0.5, 256 * 2**20)
    assert (spec.resources.disk_bytes, spec.resources.pids) == (2**30, settings.default_pids)
    assert spec.network.outbound is False and spec.network.allowed_hosts == ()
    assert spec.network.blocked_ports == tuple(sorted(settings.blocked_ports))
    assert spec.collect == ("output", "artifacts") and spec.files == () and spec.environment == {}
    assert spec.command == "ls -l" and spec.argv[1:] == ("-l",) and spec.argv[0].endswith("/ls")


def test_generated_ids_differ(settings: Settings) -> None:
    assert parse_job(b'{"command":"ls"}', settings).id != parse_job(b'{"command":"ls"}', settings).id


def test_every_field(settings: Settings) -> None:
    job = {
        "id": "job_1-A", "command": "cat 'in put.txt'", "environment": {"LANG": "C"}, "timeout": 12.5,
        "resources": {"cpu": "250m", "memory": "1G", "disk": "2Gi", "pids": 64},
        "network": {"outbound": True, "allowed_hosts": ["API.example.com"], "blocked_ports": [8080]},
        "files": [{"path": "in put.txt", "content": "hi"}, {"path": "b/x.bin", "content_base64": "AP8=", "mode": 493},
                  {"path": "c", "r2_key": "jobs/job_1-A/input/c"}],
        "callback_url": "https://hooks.example.com/x", "collect": ["output"],
    }
    spec = parse_job(json.dumps(job), settings)
    assert spec.id == "job_1-A" and spec.argv[1:] == ("in put.txt",) and spec.timeout_s == 12.5
    assert (spec.resources.cpu, spec.resources.memory_bytes, spec.resources.disk_bytes, spec.resources.pids) == (
        0.25, 10**9, 2 * 2**30, 64)
    assert spec.network.allowed_hosts == ("api.example.com",) and 8080 in spec.network.blocked_ports
    assert [f.content for f in spec.files] == [b"hi", b"\x00\xff", None]
    assert [f.mode for f in spec.files] == [0o644, 0o755, 0o644] and spec.files[2].r2_key == "jobs/job_1-A/input/c"
    assert spec.callback_url == "https://hooks.example.com/x" and spec.collect == ("output",)


def test_stored_form_round_trips(settings: Settings) -> None:
    raw = b'{"command":"ls","files":[{"path":"a","content_base64":"AAE="}],"network":{"outbound":true}}'
    spec = parse_job(raw, settings)
    again = JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


def test_dict_input_gets_the_same_checks(settings: Settings) -> None:
    # Given a job that a JSON library already decoded (it may hold NaN or non-JSON values)
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"command": "ls", "timeout": float("nan")}, "/timeout", "not_a_number"),
        ({"command": "ls", "environment": {1: "x"}}, "/environment", "type"),
        ({"command": "ls", "files": ({"path": "a", "content": "x"},)}, "/files", "type"),
        ({"command": "ls", "queue": "x"}, "/queue", "unknown_field"),
    ]
    for job, field, rule in cases:
        with pytest.raises(JobRejected) as caught:
            parse_job(job, settings)
        assert (caught.value.field, caught.value.rule) == (field, rule)
    assert parse_job({"command": "ls", "timeout": 5}, settings).timeout_s == 5.0


def test_an_object_job_past_the_document_limit_is_refused_as_its_json_would_be(settings: Settings) -> None:
    # A stock producer (send_task with a dict) sends the job as an object: kombu decodes it before
    # parse_job sees it, and the document limit never applied (a 56 MB job was accepted).
    from sandbox.spec import max_document_bytes

    content = "\u0001" * (max_document_bytes(settings) // 5)  # 6 bytes each as JSON
    with pytest.raises(JobRejected) as caught:
        parse_job({"command": "ls", "files": [{"path": "a", "content": content}]}, settings)
    assert (caught.value.field, caught.value.rule) == ("", "too_large")
    # just under it, as text and as an object alike, it gets to the checks that follow
    small = {"command": "ls", "files": [{"path": "a", "content": "x" * 1000}]}
    assert parse_job(small, settings).files == parse_job(json.dumps(small), settings).files


def test_text_input_is_accepted(settings: Settings) -> None:
    assert parse_job('{"command": "grep \u00e9 f"}', settings).argv[1] == "\u00e9"


def test_rejection_as_dict_names_field_and_rule(settings: Settings) -> None:
    with pytest.raises(JobRejected) as caught:
        parse_job(b'{"command":"ls","resources":{"memory":"64Gi"}}', settings)
    error = caught.value.as_dict()
    assert error["code"] == "rejected" and error["field"] == "/resources/memory" and error["rule"] == "above_maximum"
    assert "SANDBOX_MAX_MEMORY" in error["message"]


def test_hostile_key_is_cut_in_the_pointer(settings: Settings) -> None:
    with pytest.raises(JobRejected) as caught:
        parse_job(json.dumps({"command": "ls", "a/~" + "x" * 10000: 1}), settings)
    assert caught.value.field.startswith("/a~1~0x") and len(caught.value.field) < 100


# --- job_id_of ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"id":"ok-1","command":"rm -rf /"}', "ok-1"),
    (b'{"id":"ok-1","timeout":NaN}', "ok-1"),
    (b'{"id":"a/b"}', None), (b'{"id":"a\\n"}', None), (b'{"id":7}', None), (b'{"command":"ls"}', None),
    (b'{"id":"a","id":"b"}', None), (b"not json", None), (b"[]", None), (b"\xff", None),
    ({"id": "from-dict"}, "from-dict"), (None, None),
])
def test_job_id_of(raw: Any, expected: str | None) -> None:
    assert job_id_of(raw) == expected


# --- the schema file ---------------------------------------------------------------------------

def test_schema_is_valid_2020_12_and_portable() -> None:
    schema = job_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    text = json.dumps(schema)
    assert '"format"' not in text  # formats differ between jsonschema and ajv
    for pattern in re.findall(r'"pattern": "((?:[^"\\]|\\.)*)"', text):
        decoded = json.loads(f'"{pattern}"')
        assert "\\d" not in decoded and "(?" not in decoded and decoded.startswith("^"), decoded


def test_schema_alone_accepts_a_full_job_and_refuses_unknown_fields() -> None:
    validator = Draft202012Validator(job_schema())
    assert validator.is_valid({"command": "ls", "files": [{"path": "a", "content": "x"}], "timeout": 1})
    assert not validator.is_valid({"command": "ls", "eta": 1})
    assert not validator.is_valid({"command": "ls", "timeout": True})
    assert not validator.is_valid({"command": "ls", "files": [{"path": "a", "content": "x", "r2_key": "shared/a"}]})


@pytest.mark.parametrize("job_id", ["-abc", "_abc", "--", "a" * 64, "x"])
def test_every_id_the_contract_accepts_gets_a_safe_sandbox_id(job_id: str, settings: Settings) -> None:
    # (the local runtime wanted a letter or digit first: '-abc' passed submit and failed every create)
    from sandbox.runtimes.local import _SAFE_ID, sandbox_id_for

    spec = parse_job({"id": job_id, "command": "ls"}, settings)
    sid = sandbox_id_for(spec.id)
    assert sid == f"sbx-{job_id}" and _SAFE_ID.fullmatch(sid)


@pytest.mark.parametrize("job_id", ["a.b", "..", "a/b", "", "a" * 65, "a\n"])
def test_a_sandbox_id_is_never_made_of_an_id_the_contract_refuses(job_id: str) -> None:
    from sandbox.runtimes.local import sandbox_id_for

    with pytest.raises(JobRejected) as e:
        sandbox_id_for(job_id)
    assert e.value.field == "/id"
