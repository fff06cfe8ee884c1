"""Every route of the admin API, in one table: the app is built from it, and so is the OpenAPI
document (a test checks the two against each other)."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..auth import Permission
from . import views_cluster as cluster
from . import views_instances as instances
from . import views_jobs as jobs
from . import views_subtasks as subtasks
from .backend import Call

View = Callable[[Call], Awaitable[dict[str, Any] | web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    view: View
    summary: str
    #: the permission checked before anything else (the view checks again, knowing the app)
    permission: Permission | None = Permission.READ
    #: where it runs: "any" server; the app's "owner" (claimed if it has none: actions); "owner-read"
    #: (read at the owner if there is one, else here)
    placement: str = "any"
    #: the app of a route without {app} in its path (instances): read from the request
    app_of: Callable[[Call], Awaitable[str]] | None = None
    #: checked before the request is placed at the owner (a 404 for an unknown job claims no app)
    precheck: Callable[[Call], Awaitable[None]] | None = None
    action: str = ""  # its name in the audit log (mutating routes)
    query: tuple[str, ...] = ()
    body: str | None = None  # the OpenAPI schema of its JSON body
    success: int = 200
    streams: bool = False  # may answer server-sent events
    #: served without a token to loopback clients (and to all with --metrics-public)
    open_on_loopback: bool = False


APP = "/api/v1/apps/{app}"
_PAGE = ("cursor", "limit")

ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", cluster.healthz, "The process is up.", permission=None),
    Route("GET", "/readyz", cluster.readyz, "The store answers and this server's lease is valid.", permission=None),
    Route("GET", "/metrics", cluster.metrics, "Prometheus metrics (no token needed from loopback).",
          open_on_loopback=True),
    Route("GET", "/api/v1/openapi.json", cluster.healthz, "This document.", permission=None),  # view replaced
    Route("GET", "/api/v1/whoami", cluster.whoami, "The token's holder, role, apps and permissions."),
    Route("GET", "/api/v1/cluster", cluster.cluster, "Servers and the apps each owns."),
    Route("GET", "/api/v1/cluster/history", cluster.cluster_history, "Ownership changes, newest first.",
          query=("app", *_PAGE)),
    Route("POST", "/api/v1/servers/{id}/drain", cluster.drain_server,
          "Ask a server to hand its apps to the others ({\"undo\": true} to stop).", permission=Permission.MANAGE,
          action="server.drain", body="Drain"),
    Route("GET", APP + "/workers", cluster.workers, "The app's connected workers, as its owner sees them.",
          placement="owner-read"),
    Route("GET", APP + "/jobs", jobs.list_jobs, "The app's jobs by name.", query=("name", "tag", "enabled", *_PAGE)),
    Route("POST", APP + "/jobs", jobs.create_job, "Create a job.", permission=Permission.MANAGE, placement="owner",
          action="job.create", body="Job", success=201),
    Route("POST", APP + "/jobs/preview", jobs.preview_job, "Check an unsaved job; its next fire times.",
          query=("next",), body="Job"),
    Route("GET", APP + "/jobs/{name}", jobs.get_job, "A job (with ?next=N: its next N fire times).",
          query=("next",)),
    Route("PATCH", APP + "/jobs/{name}", jobs.patch_job, "Change some of a job's fields.",
          permission=Permission.MANAGE, placement="owner", precheck=jobs.job_exists, action="job.change",
          body="JobPatch"),
    Route("DELETE", APP + "/jobs/{name}", jobs.delete_job, "Delete a job.", permission=Permission.MANAGE,
          placement="owner", precheck=jobs.job_exists, action="job.delete"),
    Route("POST", APP + "/jobs/{name}/trigger", jobs.trigger_job,
          "Fire the job now (Idempotency-Key header: a repeated request fires once).",
          permission=Permission.TRIGGER, placement="owner", precheck=jobs.job_exists, action="job.trigger",
          body="Trigger"),
    Route("POST", APP + "/jobs/{name}/pause", jobs.pause_job, "Pause the job.", permission=Permission.OPERATE,
          placement="owner", precheck=jobs.job_exists, action="job.pause"),
    Route("POST", APP + "/jobs/{name}/resume", jobs.resume_job, "Resume the job.", permission=Permission.OPERATE,
          placement="owner", precheck=jobs.job_exists, action="job.resume"),
    Route("GET", APP + "/jobs/{name}/runs", jobs.list_runs, "Run history of a worker-run (second-level) job.",
          query=("limit",)),
    Route("GET", APP + "/instances", instances.list_instances,
          "The app's instances, latest planned first (answers may be up to 1 s old).",
          query=("job", "status", "since", "until", *_PAGE)),
    Route("GET", APP + "/stats", instances.app_stats, "Fires by outcome over time, and lateness percentiles.",
          query=("window",)),
    Route("GET", "/api/v1/instances/{id}", instances.get_instance, "An instance with every attempt of its fire."),
    Route("GET", "/api/v1/instances/{id}/logs", instances.get_logs,
          "Its log lines; ?follow=1: server-sent events until it ends.", query=("limit", "offset", "follow"),
          streams=True),
    Route("POST", "/api/v1/instances/{id}/kill", instances.kill_instance,
          "Stop it: running, it is killed on its worker; not started, it is cancelled.",
          permission=Permission.OPERATE, placement="owner", app_of=instances.app_of_instance,
          action="instance.kill"),
    Route("POST", "/api/v1/instances/{id}/retry", instances.retry_instance,
          "Run a finished instance's fire again (its next attempt).", permission=Permission.OPERATE,
          placement="owner", app_of=instances.app_of_instance, action="instance.retry", body="Retry"),
    Route("GET", "/api/v1/instances/{id}/subtasks", subtasks.list_subtasks,
          "Its fire's sub-task batches (maps, broadcast sub-runs, workflow steps) and their progress.",
          query=_PAGE),
    Route("GET", "/api/v1/instances/{id}/steps", subtasks.list_steps,
          "A workflow instance's steps: the graph, and each step's status, result and log."),
    Route("POST", "/api/v1/instances/{id}/steps/{step}/succeed", subtasks.succeed_step,
          "Mark a workflow step succeeded by hand (no attempt of the fire may run); a rerun then goes on"
          " after it.", permission=Permission.OPERATE, placement="owner", app_of=instances.app_of_instance,
          action="instance.step_succeed", body="StepSucceed"),
    Route("GET", "/api/v1/tokens", cluster.list_tokens, "Every token (no secrets).", permission=Permission.MANAGE),
    Route("POST", "/api/v1/tokens", cluster.create_token, "Create a token; its secret is shown once.",
          permission=Permission.MANAGE, action="token.create", body="TokenCreate", success=201),
    Route("DELETE", "/api/v1/tokens/{id}", cluster.revoke_token, "Revoke a token.", permission=Permission.MANAGE,
          action="token.revoke"),
    Route("GET", "/api/v1/audit", cluster.audit_log, "Mutating calls, newest first.", permission=Permission.MANAGE,
          query=("app", *_PAGE)),
)
