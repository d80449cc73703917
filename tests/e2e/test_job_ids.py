"""End to end: every id the contract accepts runs, on every runtime (ids were checked twice, by
different rules: the schema's [A-Za-z0-9_-]{1,64} and a local sandbox id wanting a letter first)."""
from __future__ import annotations

import uuid

import pytest
import requests

from tests.e2e.test_pipeline import assert_cleaned_up


@pytest.mark.parametrize("first", ["-", "_"])
def test_an_id_starting_with_a_dash_or_underscore_runs(first, submit, stack_env, redis_client):  # type: ignore[no-untyped-def]
    # Given an id the contract accepts whose first character is not a letter or digit
    job_id = f"{first}{uuid.uuid4().hex[:12]}"
    # When it goes through submit and a real worker
    record = submit({"id": job_id, "command": "python3 w.py",
                     "files": [{"path": "w.py", "content": "import os\nos.mkdir('output')\nopen('output/a.txt', 'w').write('hi')\n"}]})
    # Then it runs like any other: its objects under jobs/{id}/, its sandbox gone
    assert record["status"] == "succeeded", (record["status"], record.get("error"))
    [artifact] = record["artifacts"]
    assert artifact["key"] == f"jobs/{job_id}/output/a.txt"
    assert requests.get(artifact["url"], timeout=10).text == "hi"
    assert_cleaned_up(record, stack_env, redis_client)
