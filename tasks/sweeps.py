"""Beat's sweeps. Local sandboxes live on one host each, so the orphan sweep fans out per node."""
from __future__ import annotations

from sandbox import lifecycle, sweeps
from tasks.app import app, node_queue, services

STUCK_MARGIN_S = 600


@app.task(name="sandbox.sweep_orphans")
def sweep_orphans() -> list[str]:
    """Ask every live worker node to sweep its own sandboxes."""
    nodes = sorted({name for reply in (app.control.ping(timeout=2.0) or []) for name in reply})
    for node in nodes:
        sweep_node.apply_async(queue=node_queue(node))
    return nodes


@app.task(name="sandbox.sweep_node", ignore_result=True)
def sweep_node() -> list[str]:
    destroyed = sweeps.sweep_orphans(services())
    lifecycle.reconcile_admission(services())  # what the sweep destroyed (or a lost worker held) comes back
    return destroyed


@app.task(name="sandbox.sweep_stuck")
def sweep_stuck() -> list[str]:
    svc = services()
    return sweeps.sweep_stuck(svc, max_idle_s=svc.settings.visibility_timeout_s + STUCK_MARGIN_S)


@app.task(name="sandbox.sweep_artifacts")
def sweep_artifacts() -> int:
    """Re-assert the bucket's lifecycle rules, then delete what is past retention anyway."""
    svc = services()
    svc.artifacts.apply_lifecycle(svc.settings.retention_days)
    return svc.artifacts.sweep_expired(svc.settings.retention_days)
