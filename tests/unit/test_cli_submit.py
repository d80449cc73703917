"""`python -m sandbox submit` sends the file's own text (plus an id when it has none): never a
re-serialised parse, so the worker refuses exactly what `validate` refuses."""
from __future__ import annotations

import json

import pytest

from config.settings import load_settings
from sandbox.__main__ import _with_id
from sandbox.errors import JobRejected
from sandbox.spec import max_document_bytes, parse_job

SETTINGS = load_settings({})


def _refusal(text: str) -> str | None:
    try:
        parse_job(text.encode(), SETTINGS)
    except JobRejected as e:
        return e.rule
    return None


@pytest.mark.parametrize("raw, rule", [
    (b'{"command": "cat secret.txt", "command": "ls"}', "duplicate_key"),  # json.loads keeps the last
    (b'{"command": "ls", "timeout": NaN}', "not_a_number"),
    (b'{"command": "ls", "environment": {"A": "1", "A": "2"}}', "duplicate_key"),
])
def test_a_file_validate_refuses_is_sent_unchanged_and_refused_alike(raw: bytes, rule: str) -> None:
    assert _refusal(raw.decode()) == rule  # what `validate` says of the file
    text, job_id = _with_id(raw)
    assert text == raw.decode() and job_id is None
    assert _refusal(text) == rule


@pytest.mark.parametrize("raw", [
    b'{"command": "ls"}', b' \n\t{\n  "command" : "ls", "timeout": 1.5e1 }\n', b'{"command":"cat \xc3\xa9t\xc3\xa9.txt"}',
])
def test_a_job_without_an_id_gets_one_spliced_in_and_is_otherwise_byte_for_byte_the_file(raw: bytes) -> None:
    text, job_id = _with_id(raw)
    assert job_id and len(job_id) == 32
    member = f'"id":"{job_id}",'
    assert text.replace(member, "", 1) == raw.decode()  # the file's text, one member added
    assert json.loads(text)["id"] == job_id and _refusal(text) is None
    assert parse_job(text.encode(), SETTINGS).id == job_id


def test_an_empty_object_gets_the_id_without_a_trailing_comma() -> None:
    text, job_id = _with_id(b" { } ")
    assert text == ' {"id":"' + str(job_id) + '" } ' and json.loads(text) == {"id": job_id}


def test_a_job_with_an_id_is_sent_as_it_is() -> None:
    raw = b'{"id": "mine-1", "command": "ls"}'
    assert _with_id(raw) == (raw.decode(), "mine-1")


def test_the_id_never_pushes_a_document_past_the_size_limit() -> None:
    raw = b'{"command": "ls"}'
    assert _with_id(raw, max_bytes=len(raw) + 10) == (raw.decode(), None)  # the worker gives it its own
    text, job_id = _with_id(raw, max_bytes=len(raw) + 40)  # '"id":"<32 hex>",' is 40 bytes
    assert job_id and len(text.encode()) == len(raw) + 40
    assert _with_id(raw)[1] and max_document_bytes(SETTINGS) > 2**20  # the default: the settings' limit


def test_a_cli_command_with_redis_unreachable_says_so_without_a_traceback() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from devstack.processes import free_port

    done = subprocess.run([sys.executable, "-m", "sandbox", "show", "some-job"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=60,
                          env={**os.environ, "SANDBOX_REDIS_URL": f"redis://:secret-pw@127.0.0.1:{free_port()}/0"})
    assert done.returncode == 1 and "error: Redis unreachable at 127.0.0.1:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "secret-pw" not in done.stderr
