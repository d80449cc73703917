"""The alerting rules are valid Prometheus rules, fire on the failures they name (promtool's own rule
tests), and the rules and the dashboard only use metrics the service really exports."""
from __future__ import annotations

import json
import re
import subprocess

from tests.support.services import ROOT, require

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "sandbox.json"


def exported_names() -> set[str]:
    """Every metric family the worker serves: the counters/histograms and the scrape-time gauges."""
    from prometheus_client import REGISTRY

    import sandbox.observability.metrics  # noqa: F401  (registers the counters and histograms)

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {family.name + suffix for family in REGISTRY.collect() for suffix in suffixes.get(family.type, ("",))}
    gauges = (ROOT / "sandbox" / "observability" / "gauges.py").read_text()
    names |= set(re.findall(r'"(sandbox_[a-z_]+)"', gauges))
    names |= {f"sandbox_node_{kind}_{unit}" for kind in ("admitted", "capacity")
              for unit in ("cpu_cores", "memory_bytes", "disk_bytes", "sandboxes")}
    return names | {"up"}


def used_names(text: str) -> set[str]:
    return set(re.findall(r"\b(sandbox_[a-z_]+|up)\b(?=\s*[{\[)\s]|$)", text))


def test_promtool_accepts_the_rules():
    promtool = require("promtool")
    done = subprocess.run([promtool, "check", "rules", str(PROMETHEUS / "alerts.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_each_alert_fires_on_its_failure_and_not_otherwise():
    promtool = require("promtool")
    done = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rules_and_dashboard_use_only_exported_metrics():
    exported = exported_names()
    rules = (PROMETHEUS / "alerts.yml").read_text()
    exprs = "\n".join(t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", []))
    for where, text in (("alerts.yml", rules), ("sandbox.json", exprs)):
        unknown = used_names(text) - exported
        assert not unknown, f"{where} uses metrics nobody exports: {sorted(unknown)}"
