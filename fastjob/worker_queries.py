"""Deprecated: an operator's queries and changes over the worker protocol.

Getting and listing jobs, instances and log lines, deleting and enabling jobs, and the
``role="client"`` session that makes them, move to the HTTP admin API and its typed
``fastjob.Client`` (protocol.md, section 6.5). They keep working in protocol versions 1 and 2, so
they live here, apart from what a worker needs (declaring its jobs, firing them with ``trigger``),
and go away with them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class OperatorQueries:
    """Deprecated operator queries, mixed into :class:`fastjob.Worker`; each is one :meth:`call`."""

    async def call(self, kind: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """One API request to the app's owner: provided by the class this is mixed into."""
        raise NotImplementedError

    async def get_instance(self, instance_id: int) -> dict[str, Any]:
        instance: dict[str, Any] = (await self.call("INSTANCE_GET", {"instance_id": instance_id}))["instance"]
        return instance

    async def list_instances(self, job: str | None = None, status: Sequence[str] = (),
                             limit: int = 100) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"limit": limit}
        if job:
            body["job"] = job
        if status:
            body["status"] = list(status)
        instances: list[dict[str, Any]] = (await self.call("INSTANCE_LIST", body))["instances"]
        return instances

    async def get_logs(self, instance_id: int, limit: int = 1000) -> list[list[Any]]:
        lines: list[list[Any]] = (await self.call("LOG_GET", {"instance_id": instance_id, "limit": limit}))["lines"]
        return lines

    async def list_runs(self, job: str, limit: int = 100) -> list[dict[str, Any]]:
        """The run history of a second-level job, newest first (protocol version 3)."""
        runs: list[dict[str, Any]] = (await self.call("RUN_LIST", {"job": job, "limit": limit}))["runs"]
        return runs

    async def get_job(self, name: str) -> dict[str, Any]:
        job: dict[str, Any] = (await self.call("JOB_GET", {"name": name}))["job"]
        return job

    async def list_jobs(self) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = (await self.call("JOB_LIST", {}))["jobs"]
        return jobs

    async def delete_job(self, name: str) -> bool:
        return bool((await self.call("JOB_DELETE", {"name": name}))["deleted"])

    async def set_enabled(self, name: str, enabled: bool) -> bool:
        return bool((await self.call("JOB_ENABLE", {"name": name, "enabled": enabled}))["ok"])
