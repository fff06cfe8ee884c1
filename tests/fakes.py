"""Stand-ins for the server's sessions and cluster, so the scheduler's parts run in one process
against a memory store and fake time (see tests/test_scheduler_rules.py)."""
from __future__ import annotations

from typing import Any

from fastjob.models import InstanceRow, JobSpec, Status
from fastjob.schedule import first_fire_ms
from fastjob.server.scheduler import Scheduler
from fastjob.store import Store, StoreError, create_store
from fastjob.testing import FakeClock, settle

APP = "app"
SERVER = "s1"


class FakeSession:
    """A connected worker as the scheduler sees it: it records the frames sent to it."""

    def __init__(self, worker_id: str, app: str = APP, capacity: int = 4, last_received: float = 0.0,
                 version: int = 4) -> None:
        self.app = app
        self.worker_id = worker_id
        self.role = "worker"
        self.capacity = capacity
        self.draining = False
        self.tags: frozenset[str] = frozenset()
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.version = version
        self.running: set[int] = set()
        self.leading: set[int] = set()
        self.last_received = last_received
        self.hello_running: list[int] = []
        self.hello_finished: list[int] = []
        self.hello_leading: list[int] = []
        self.redirected = False
        self.closed = False
        self.closed_by_peer = False
        self.handed: set[int] = set()  # second-level jobs handed down to it
        self.handler_kinds: dict[str, str] = {}

    @property
    def accepts_jobs(self) -> bool:
        return not self.draining

    @property
    def takes_lead_fires(self) -> bool:
        return self.version >= 5

    def has_room(self) -> bool:
        return len(self.running) < self.capacity

    def has_tags(self, tags: list[str]) -> bool:
        return set(tags) <= self.tags

    def load(self) -> float:
        return len(self.running) / self.capacity

    def send(self, kind: str, body: dict[str, Any]) -> None:
        self.sent.append((kind, body))

    def runs(self, instance_id: int, lead: bool = False) -> None:
        (self.leading if lead else self.running).add(instance_id)

    def started(self, instance_id: int) -> None:
        if instance_id in self.leading:
            self.leading.discard(instance_id)
            self.running.add(instance_id)

    def ended(self, instance_id: int) -> None:
        self.running.discard(instance_id)
        self.leading.discard(instance_id)

    def forget_runs(self) -> list[int]:
        ids, self.running, self.leading = sorted(self.running | self.leading), set(), set()
        return ids

    def hand_down(self, job_id: int) -> None:
        self.handed.add(job_id)

    def take_back(self, job_id: int) -> None:
        self.handed.discard(job_id)

    @property
    def second_level_count(self) -> int:
        return len(self.handed)

    def redirect_away(self) -> None:
        self.redirected = True

    def dispatched(self) -> list[dict[str, Any]]:
        return [body for kind, body in self.sent if kind == "DISPATCH"]


class FakeCluster:
    """Ownership as the scheduler asks about it; a test flips ``lease_ok`` to lose the lease."""

    def __init__(self, server_id: str = SERVER) -> None:
        self.server_id = server_id
        self.owned: dict[str, int] = {}
        self.lease_ok = True
        self.renew_ok = True
        self.interval = 0.01
        self.renewals = 0

    def owns(self, app: str, epoch: int) -> bool:
        return self.owned.get(app) == epoch

    def lease_valid(self) -> bool:
        return self.lease_ok

    async def renew(self) -> None:
        self.renewals += 1
        if not self.renew_ok:
            raise StoreError("database unreachable (fake)")
        self.lease_ok = True

    async def sync(self) -> None:
        pass


class Scene:
    """A scheduler owning APP on a memory store, with fake time, fake workers and a fake cluster."""

    def __init__(self, **config: Any) -> None:
        self.clock = FakeClock()
        self.cluster = FakeCluster()
        self.store: Store = create_store("memory://")
        self.sessions: list[FakeSession] = []
        settings: dict[str, Any] = dict(scan_horizon=5.0, scan_interval=3600.0, dispatch_wait=30.0,
                                        misfire_threshold=5.0, heartbeat_timeout=3.0, run_lease=10.0)
        settings.update(config)
        self.scheduler = Scheduler(
            self.store, self.cluster,
            workers_of=lambda app: [s for s in self.sessions if s.app == app],
            is_second_level=lambda job: False, clock=self.clock, timer_factory=self.clock.timer_factory,
            **settings)
        self.epoch = 0

    async def start(self) -> Scene:
        await self.store.open()
        await self.store.ensure_app(APP)
        epoch = await self.store.claim_app(APP, SERVER, 0)
        assert epoch is not None
        self.epoch = epoch
        self.cluster.owned[APP] = self.epoch
        self.scheduler.start()
        return self

    async def close(self) -> None:
        await self.scheduler.stop()
        await self.store.close()

    def worker(self, worker_id: str, **kw: Any) -> FakeSession:
        session = FakeSession(worker_id, **kw)
        self.sessions.append(session)
        self.scheduler.worker_joined(session, [], [])
        return session

    def worker_rejoins(self, worker_id: str, leading: list[int], **kw: Any) -> FakeSession:
        """A new session of a worker whose HELLO names the lead fires it holds unstarted."""
        session = FakeSession(worker_id, version=5, **kw)
        session.hello_leading = list(leading)
        self.sessions.append(session)
        self.scheduler.worker_joined(session, [], [])
        return session

    async def job(self, name: str, **fields: Any) -> int:
        """Declare a job; it is claimed (written to the WAL) by the next scan."""
        spec = JobSpec(app=APP, name=name, handler=name, **fields)
        now_ms = int(self.clock.wall() * 1000)
        row = await self.store.upsert_job(spec, first_fire_ms(spec, now_ms), self.clock.wall())
        self.scheduler.job_changed(row)
        return row.id

    async def scan(self) -> int:
        return await self.scheduler.scanner.scan_app(APP, self.epoch)

    async def advance(self, seconds: float) -> None:
        await self.clock.advance(seconds)

    def result(self, session: FakeSession, instance_id: int, status: Status = Status.SUCCEEDED,
               error: str | None = None) -> None:
        self.scheduler.on_result(session, {
            "instance_id": instance_id, "status": status.value, "error": error,
            "finished_at": self.clock.wall()})

    async def rows(self, job_id: int) -> list[InstanceRow]:
        await self.scheduler.writer.flush()
        await settle()
        rows = await self.store.list_instances(APP, job_id=job_id, limit=1000)
        return sorted(rows, key=lambda r: (r.planned_ms, r.attempt))
