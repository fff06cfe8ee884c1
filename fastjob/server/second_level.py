"""Second-level jobs: handed down to one worker of the app, which schedules them itself."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..store import JobRow

if TYPE_CHECKING:
    from .app import FastJobServer
    from .session import WorkerSession

log = logging.getLogger("fastjob.second_level")


class SecondLevel:
    """Assigns each second-level job of an owned app to one live worker (issue 6)."""

    def __init__(self, server: "FastJobServer") -> None:
        self.server = server

    def worker_joined(self, session: "WorkerSession", running: list[int]) -> None:
        pass

    def worker_left(self, session: "WorkerSession") -> None:
        pass

    def job_changed(self, job: JobRow) -> None:
        pass

    async def app_gained(self, app: str) -> None:
        pass

    def app_lost(self, app: str) -> None:
        pass

    def on_report(self, session: "WorkerSession", body: dict[str, Any]) -> None:
        pass
