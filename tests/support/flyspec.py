"""Fly's Machines API OpenAPI spec as a strict request validator (unknown fields and wrong types refused).

The published spec leaves `additionalProperties` open; Fly's API (Go structs) ignores unknown fields
silently, which would hide a misspelt field forever. The fake refuses them, so a typo fails a test.
"""
from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator

# Fly's published spec, vendored verbatim (see docs/fly.md for its source and commit)
SPEC_PATH = Path(__file__).with_name("machines-openapi.json")


class SpecViolation(ValueError):
    """A request that Fly's spec does not allow."""


@lru_cache(maxsize=1)
def spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text())


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@lru_cache(maxsize=1)
def _components() -> dict[str, Any]:
    return _strict(copy.deepcopy(spec()["components"]))


@lru_cache(maxsize=1)
def _operations() -> list[tuple[str, re.Pattern[str], dict[str, Any]]]:
    ops = []
    for template, item in spec()["paths"].items():
        pattern = re.compile("^" + re.sub(r"\{[^/]+\}", "[^/]+", template) + "$")
        for method, op in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                ops.append((method.upper(), pattern, op))
    return ops


def operation(method: str, path: str) -> dict[str, Any]:
    """The spec's operation for `method` `path` (a path under /v1), or SpecViolation."""
    candidates = [op for m, pattern, op in _operations() if m == method and pattern.match(path)]
    if not candidates:
        raise SpecViolation(f"{method} {path} is not an operation of the Machines API")
    # a literal segment wins over a parameter in the same place
    return min(candidates, key=lambda op: sum(p.get("in") == "path" for p in op.get("parameters", [])))


def _check_query_value(name: str, raw: str, schema: dict[str, Any]) -> None:
    kind = schema.get("type")
    if kind == "boolean" and raw not in ("true", "false"):
        raise SpecViolation(f"query {name}={raw!r} is not a boolean")
    if kind == "integer" and not re.fullmatch(r"-?[0-9]+", raw):
        raise SpecViolation(f"query {name}={raw!r} is not an integer")
    if "enum" in schema and raw not in schema["enum"]:
        raise SpecViolation(f"query {name}={raw!r} is not one of {schema['enum']}")


def validate_request(method: str, path: str, query: dict[str, list[str]], body: Any) -> str:
    """Check a request against the spec (strictly); returns its operationId."""
    op = operation(method, path)
    params = {p["name"]: p for p in op.get("parameters", []) if p.get("in") == "query"}
    for name, values in query.items():
        if name not in params:
            raise SpecViolation(f"query parameter {name!r} is not in the spec of {op['operationId']}")
        if len(values) != 1:
            raise SpecViolation(f"query parameter {name!r} given {len(values)} times")
        _check_query_value(name, values[0], params[name].get("schema", {}))
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if schema is None:
        if body is not None:
            raise SpecViolation(f"{op['operationId']} takes no body")
        return op["operationId"]
    if body is None and op.get("requestBody", {}).get("required"):
        raise SpecViolation(f"{op['operationId']} needs a JSON body")
    validator = Draft7Validator({**schema, "components": _components()})
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/" + "/".join(str(p) for p in e.absolute_path)
        raise SpecViolation(f"body {where}: {e.message[:300]}")
    return op["operationId"]
