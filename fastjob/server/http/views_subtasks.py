"""An instance's sub-tasks: the progress and batches of its maps, a broadcast's sub-runs, and a
workflow's steps (with marking a step succeeded by hand). Read from the database, so any server
answers the reads; the owner writes."""
from __future__ import annotations

import time
from typing import Any

from ...fanout import WORKFLOW_HANDLER, normalize_steps, step_call
from ...models import FINAL_STATUSES, TaskBatch, TaskStatus, fire_key, task_key
from ..auth import Permission
from ..interventions import fire_attempts
from .backend import Call
from .errors import HttpError
from .views_instances import _instance_or_404

#: Batches one page lists (``?limit=``), and items whose results a batch shows in full.
MAX_BATCHES = 1000
RESULTS_SHOWN = 100


def batch_json(batch: TaskBatch) -> dict[str, Any]:
    extra = batch.extra or {}
    out: dict[str, Any] = {
        "key": batch.key, "parent": batch.parent, "call": batch.call, "start": batch.start, "size": batch.size,
        "status": batch.status, "worker": batch.worker, "attempts": batch.attempt,
        "created_at": batch.created_at, "finished_at": batch.finished_at,
        "failed": len(batch.errors or ()), "errors": (batch.errors or [])[:RESULTS_SHOWN],
        "logs": batch.logs or [],
    }
    if "shard" in extra:
        out["shard"] = extra["shard"]
    if batch.size <= RESULTS_SHOWN:
        out["results"] = batch.results
    return out


async def list_subtasks(call: Call) -> dict[str, Any]:
    """Its fire's sub-task batches (every attempt shares them) and their progress."""
    row = await _instance_or_404(call)
    call.require(Permission.READ, row.app)
    root = fire_key(row.job_id, row.planned_ms)
    limit = call.query_int("limit", 100, 1, MAX_BATCHES) or 100
    after = call.request.query.get("cursor", "")[:1000]
    store = call.backend.store
    batches = await store.list_task_batches(root, after_key=after, limit=limit)
    items, done, failed = (await store.task_progress([root])).get(root, (0, 0, 0))
    return {"progress": {"items": items, "done": done, "failed": failed},
            "batches": [batch_json(b) for b in batches],
            "next_cursor": batches[-1].key if len(batches) == limit else None}


async def list_steps(call: Call) -> dict[str, Any]:
    """A workflow instance's graph: each step with its upstream steps and what became of it."""
    row = await _instance_or_404(call)
    call.require(Permission.READ, row.app)
    steps = await _steps_of(call, row.job_id)
    root = fire_key(row.job_id, row.planned_ms)
    stored = {b.call: b for b in await call.backend.store.list_task_batches(root, parent=root, limit=MAX_BATCHES)}
    out = []
    for name, step in steps.items():
        batch = stored.get(step_call(steps, name))
        error = batch.errors[0][1] if batch is not None and batch.errors else None
        out.append({"name": name, "after": step["after"], "handler": step.get("handler"), "job": step.get("job"),
                    "on_failure": step.get("on_failure", "fail"),
                    "status": "not_started" if batch is None else batch.status,
                    "result": None if batch is None or not batch.results else batch.results[0], "error": error,
                    "worker": None if batch is None else batch.worker,
                    "attempts": 0 if batch is None else batch.attempt,
                    "finished_at": None if batch is None else batch.finished_at,
                    "logs": [] if batch is None else batch.logs or []})
    return {"instance_id": row.id, "steps": out}


async def succeed_step(call: Call) -> dict[str, Any]:
    """Mark a workflow step succeeded by hand (with ``result``), while no attempt of the fire runs:
    the next rerun of the fire takes it as done and runs what follows it."""
    row = await _instance_or_404(call)
    call.require(Permission.OPERATE, row.app)
    steps = await _steps_of(call, row.job_id)
    name = call.request.match_info["step"]
    if name not in steps:
        raise HttpError("not_found", f"the workflow has no step {name[:190]!r}")
    store = call.backend.store
    attempts = await fire_attempts(store, row)
    running = [a for a in attempts if a.status not in FINAL_STATUSES]
    if running:
        raise HttpError("conflict", f"attempt {running[0].attempt} of this fire has not ended; mark steps once it has")
    body = await call.body()
    root, number = fire_key(row.job_id, row.planned_ms), step_call(steps, name)
    now = time.time()
    found = await store.list_task_batches(root, parent=root, call=number, limit=1)
    batch = found[0] if found else TaskBatch(task_key(root, number, 0), row.app, root, root, number, 0,
                                             steps[name].get("handler") or "", [steps[name].get("params")],
                                             parent_attempt=max(a.attempt for a in attempts), created_at=now)
    batch.status, batch.results, batch.errors = TaskStatus.SUCCEEDED.value, [body.get("result")], None
    batch.finished_at = now
    batch.logs = (batch.logs or []) + [[now, "INFO", f"marked succeeded by {call.principal.name}"]]
    if found:
        await store.save_task_batches([batch])
    else:
        await store.add_task_batches([batch])
    return {"instance_id": row.id, "step": name, "status": batch.status}


async def _steps_of(call: Call, job_id: int) -> dict[str, dict[str, Any]]:
    job = await call.backend.store.get_job(job_id)
    if job is None or job.handler != WORKFLOW_HANDLER:
        raise HttpError("invalid", "this instance is not a workflow's")
    try:
        return normalize_steps((job.params or {}).get("steps"))
    except ValueError as exc:
        raise HttpError("invalid", f"the workflow's steps are invalid: {exc}") from None
