"""Runs that coordinate sub-tasks on other workers: a broadcast job's fire, and a workflow (DAG).

Both run as an ordinary instance on one worker (so the fire contract, retries, timeouts, overlap
and failover apply to them unchanged) and fan their work out as sub-task batches
(worker_tasks.py): a broadcast as one sub-run per worker, a workflow as one batch per step, each
started as soon as its upstream steps succeeded. Batches are stored with their results, so a
re-run of the fire (a retry, an operator's rerun, a worker lost) runs only what did not succeed.
"""
from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from .context import JobContext, TaskFailed

#: The built-in handler a workflow job names; every worker has it.
WORKFLOW_HANDLER = "fastjob:workflow"
#: What a step does when it fails after its retries.
ON_FAILURE = ("fail", "skip")
#: The settings a step may have besides its upstream steps.
STEP_KEYS = ("after", "handler", "job", "retries", "timeout", "on_failure", "params")
MAX_STEPS = 1000


class BroadcastFailed(Exception):
    """Fewer sub-runs of a broadcast succeeded than its job's ``min_success`` asks."""


class WorkflowFailed(Exception):
    """A workflow step failed (with ``on_failure="fail"``) after its retries."""


# ---- broadcast ---------------------------------------------------------------------------------
async def run_broadcast(ctx: JobContext) -> dict[str, Any]:
    """A broadcast job's fire: the handler on every connected worker (with the job's tags), each
    a sub-run told its shard; it succeeds when at least ``min_success`` of them do."""
    settings = ctx.broadcast_of or {}
    results = await ctx.broadcast(settings["handler"], ctx.params, tags=settings.get("tags") or (),
                                  timeout=settings.get("timeout"))
    failed = {index: r.error for index, r in enumerate(results) if type(r) is TaskFailed}
    summary = {"workers": len(results), "succeeded": len(results) - len(failed),
               "results": [None if type(r) is TaskFailed else r for r in results],
               "errors": {str(index): error for index, error in failed.items()}}
    needed = float(settings.get("min_success", 1.0)) * len(results)
    if len(results) - len(failed) < needed - 1e-9:
        first = min(failed)
        raise BroadcastFailed(f"{len(failed)} of {len(results)} sub-runs failed (min_success"
                              f" {settings.get('min_success', 1.0)}); shard {first}: {failed[first]}")
    return summary


# ---- workflows ---------------------------------------------------------------------------------
def normalize_steps(steps: Any, handlers: Mapping[str, Any] | None = None,
                    jobs: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Steps as a workflow job's params keep them: ``{name: {"after": [...], "handler" or "job",
    ...}}``. A step given as a list names its upstream steps, and the step's own name then names a
    handler (in ``handlers``) or a job (in ``jobs``; a handler of that name if neither is given).
    Raises ValueError, naming the step, for a bad setting, an unknown upstream step or a cycle."""
    if not isinstance(steps, Mapping) or not steps:
        raise ValueError("a workflow needs steps: a map of step name to its upstream steps")
    if len(steps) > MAX_STEPS:
        raise ValueError(f"a workflow has at most {MAX_STEPS} steps")
    out: dict[str, dict[str, Any]] = {}
    for name, spec in steps.items():
        if not isinstance(name, str) or not name or len(name) > 190:
            raise ValueError(f"step name {name!r} must be a string of 1 to 190 characters")
        out[name] = _step(name, spec, handlers, jobs)
    check_graph(out)
    return out


def _step(name: str, spec: Any, handlers: Mapping[str, Any] | None, jobs: Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(spec, (list, tuple)):
        spec = {"after": list(spec)}
    if not isinstance(spec, Mapping):
        raise ValueError(f"step {name!r}: give its upstream steps (a list) or its settings (a map)")
    unknown = sorted(set(spec) - set(STEP_KEYS))
    if unknown:
        raise ValueError(f"step {name!r}: unknown setting {unknown[0]!r}; known: {', '.join(STEP_KEYS)}")
    step = dict(spec)
    after = step.get("after") or []
    if not isinstance(after, (list, tuple)) or not all(isinstance(u, str) for u in after):
        raise ValueError(f"step {name!r}: 'after' must list step names")
    step["after"] = list(dict.fromkeys(after))
    if step.get("handler") and step.get("job"):
        raise ValueError(f"step {name!r}: name a handler or a job, not both")
    if not step.get("handler") and not step.get("job"):
        if handlers is not None and name in handlers:
            step["handler"] = name
        elif jobs is not None and name in jobs:
            step["job"] = name
        elif handlers is not None:
            raise ValueError(f"step {name!r} names no handler and no job of this worker; give handler= or job=")
        else:
            step["handler"] = name
    if handlers is not None and step.get("handler") and step["handler"] not in handlers:
        raise ValueError(f"step {name!r}: unknown handler {step['handler']!r}")
    if step.get("on_failure", "fail") not in ON_FAILURE:
        raise ValueError(f"step {name!r}: on_failure must be one of {', '.join(ON_FAILURE)}")
    retries = step.get("retries", 0)
    if type(retries) is not int or not 0 <= retries <= 100:
        raise ValueError(f"step {name!r}: retries must be a whole number from 0 to 100")
    timeout = step.get("timeout")
    if timeout is not None and (type(timeout) not in (int, float) or not 0 < timeout < 1e7):
        raise ValueError(f"step {name!r}: timeout must be a positive number of seconds")
    return step


def check_graph(steps: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse an upstream step that is not a step, and a cycle (naming it: a -> b -> a)."""
    for name, step in steps.items():
        for upstream in step.get("after") or ():
            if upstream not in steps:
                raise ValueError(f"step {name!r} runs after {upstream!r}, which is not a step of the workflow")
    state: dict[str, int] = {}  # 1: on the path being explored, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for upstream in steps[name].get("after") or ():
            if state.get(upstream) == 1:
                cycle = path[path.index(upstream):] + [upstream]
                raise ValueError("the steps form a cycle: " + " -> ".join(reversed(cycle)))
            if upstream not in state:
                visit(upstream, path + [upstream])
        state[name] = 2

    for name in steps:
        if name not in state:
            visit(name, [name])


def step_call(steps: Mapping[str, Any], name: str) -> int:
    """The call number a step's batch is written under: its place in the declaration, from 1 (the
    same in every attempt of the fire, so a rerun finds what its earlier attempts did)."""
    return list(steps).index(name) + 1


async def run_workflow(ctx: JobContext) -> dict[str, Any]:
    """A workflow's fire: each step as soon as all its upstream steps succeeded (or failed and were
    skipped), in parallel where the graph allows; ``ctx.upstream`` gives a step its upstream
    results. A failing step with on_failure "fail" starts nothing more and fails the workflow once
    the running steps ended; "skip" lets its downstream steps run (its result is None)."""
    client = ctx.tasks_client()
    steps = normalize_steps((ctx.params or {}).get("steps"))
    ctx._calls = len(steps)  # the steps take call numbers 1..n (step_call): the run has fanned out
    status = dict.fromkeys(steps, "waiting")
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    running: dict[asyncio.Task[tuple[bool, Any]], str] = {}
    try:
        while True:
            if not any(s == "failed" for s in status.values()):
                for name in _ready(steps, status):
                    step = steps[name]
                    upstream = {u: results.get(u) for u in step["after"]}
                    running[asyncio.ensure_future(client.step(
                        ctx, step_call(steps, name), step, step.get("params"), upstream))] = name
                    status[name] = "running"
            if not running:
                break
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                name = running.pop(task)
                ok, value = task.result()
                if ok:
                    status[name], results[name] = "succeeded", value
                else:
                    errors[name] = value
                    status[name] = "skipped" if steps[name].get("on_failure") == "skip" else "failed"
    finally:
        for task in running:
            task.cancel()
    failed = [name for name, s in status.items() if s == "failed"]
    if failed:
        raise WorkflowFailed(f"step {failed[0]!r} failed: {errors[failed[0]]}")
    return {"steps": status, "results": results, "errors": errors}


def _ready(steps: Mapping[str, Mapping[str, Any]], status: Mapping[str, str]) -> list[str]:
    return [name for name, step in steps.items() if status[name] == "waiting"
            and all(status[u] in ("succeeded", "skipped") for u in step["after"])]
