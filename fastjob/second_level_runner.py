"""Worker side of second-level jobs: run jobs handed down by the server from the worker's own wheel."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("fastjob.worker")


class SecondLevelRunner:
    """Placeholder until second-level jobs land (issue 6)."""

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker

    def job_ids(self) -> list[int]:
        return []

    def connected(self) -> None:
        pass

    def disconnected(self) -> None:
        pass

    def assign(self, job: dict[str, Any], lease: float) -> None:
        pass

    def revoke(self, job_id: int, reason: str) -> None:
        pass

    def stop_all(self, reason: str) -> None:
        pass

    async def wait_stopped(self, timeout: float) -> None:
        pass
