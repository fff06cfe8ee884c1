"""The FastJob server: accepts worker connections, owns apps, schedules and dispatches fires."""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Collection
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from .. import schedule
from ..models import InstanceRow, JobRow, JobSpec, Status
from ..protocol import ErrorCode
from ..store import Store, StoreError, create_store
from ..tasks import BackgroundTasks
from .alarms import AlarmRules, AlarmSender, Webhook
from .audit import AuditLog
from .auth import VERIFY_CACHE_SECONDS, TokenAuthority
from .cluster import Cluster, Origin
from .config import ServerConfig
from .http import AdminHttp, Owner
from .metrics import Gauges, Metrics, ServerCollector
from .reconcile import Reconciler
from .retention import Retention
from .scheduler import Scheduler
from .second_level import SecondLevel
from .session import WorkerSession
from .subtasks import TaskBroker

log = logging.getLogger("fastjob.server")

#: Seconds between two dead-man checks.
DEAD_MAN_CHECK = 5.0


#: A worker's reports about sub-tasks (the TaskBroker takes them).
SUBTASK_REPORTS = frozenset({"TASKS", "TASKS_DONE", "PARK", "TASKS_ABANDON"})


class FastJobServer:
    """Wires the store, the cluster view, the scheduler and the TCP listener together."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.store: Store = create_store(config.db)
        self.metrics = Metrics()
        self.store.observer = self.metrics.store_op
        self._registry: CollectorRegistry | None = None
        self._unfinished: tuple[float, list[tuple[str, str, int]]] = (0.0, [])
        self.auth = TokenAuthority(self.store)
        self.audit = AuditLog(self.store)
        self.http: AdminHttp | None = None
        self.connections: set[WorkerSession] = set()
        self.sessions: dict[str, list[WorkerSession]] = {}  # app -> established sessions
        self._listener: asyncio.base_events.Server | None = None
        self.tasks = BackgroundTasks(expected=(StoreError,))
        self.address = ""
        self.cluster: Cluster
        self.scheduler: Scheduler
        self.second_level: SecondLevel
        self.reconciler: Reconciler
        self.subtasks: TaskBroker

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> str:
        """Open the store, bind, join the cluster; return the advertised address."""
        cfg = self.config
        await self.store.open()
        self._listener = await asyncio.get_running_loop().create_server(
            lambda: WorkerSession(self), cfg.host, cfg.port, ssl=self._ssl_context(), reuse_address=True)
        bound_port = self._listener.sockets[0].getsockname()[1]
        self.address = cfg.advertise or f"{cfg.host}:{bound_port}"
        server_id = cfg.server_id or self.address
        for app, token in cfg.app_tokens.items():
            await self.store.ensure_app(app)
            await self.auth.ensure_app_token(app, token)
        webhooks = [Webhook.parse(hook) for hook in cfg.alarm_webhooks]
        self.alarm_rules = AlarmRules(webhooks, server_id, self._instance_link)
        self.cluster = Cluster(self.store, server_id, self.address, cfg.heartbeat_interval,
                               cfg.heartbeat_timeout, self._app_gained, self._app_lost, self._app_drain,
                               self._app_undrain, self._fire_rates, changes=self.metrics.ownership_changes)
        self.scheduler = Scheduler(
            self.store, self.cluster,
            scan_horizon=cfg.scan_horizon,
            scan_interval=cfg.scan_interval or cfg.scan_horizon / 5,
            dispatch_wait=cfg.dispatch_wait,
            misfire_threshold=cfg.misfire_threshold,
            heartbeat_timeout=cfg.heartbeat_timeout,
            run_lease=cfg.effective_run_lease,
            status_flush_interval=cfg.status_flush_interval,
            workers_of=self.workers_of,
            is_second_level=self.is_second_level,
            metrics=self.metrics,
            alarm_rules=self.alarm_rules,
            lead_time=cfg.effective_lead_time,
        )
        self.second_level = SecondLevel(
            self.store, self.tasks,
            heartbeat_interval=cfg.heartbeat_interval,
            heartbeat_timeout=cfg.heartbeat_timeout,
            owns=self.cluster.owns,
            workers_of=self.workers_of,
            is_second_level=self.is_second_level,
            metrics=self.metrics,
        )
        self.subtasks = TaskBroker(
            store=self.store, workers_of=self.workers_of, tasks=self.tasks, run_lease=cfg.effective_run_lease,
            lease_margin=self.scheduler.lease_margin,
            dispatch_wait=cfg.dispatch_wait, room_freed=self.scheduler.dispatcher.drain_pending,
            jobs=self.scheduler.jobs, metrics=self.metrics)
        self.reconciler = Reconciler(self.store, cfg.undeclared_grace, owned=lambda: self.cluster.owned,
                                     declarations=self.live_declarations, changed=self._job_changed)
        self.cluster.alarm = self._cluster_alarm
        self.scheduler.start()
        if cfg.http_port >= 0:
            self.http = AdminHttp(self)
            bound = await self.http.start(cfg.effective_http_host, cfg.http_port)
            self.cluster.http_address = cfg.http_advertise or bound
            await self._first_admin_token()
        await self.cluster.start()
        self.tasks.spawn(self._reconcile_loop(), "fastjob-reconcile")
        self.tasks.spawn(self.audit.run(), "fastjob-audit")
        self.tasks.spawn(self._token_watch(), "fastjob-token-watch")
        if webhooks:
            self.alarm_sender = AlarmSender(self.store, server_id, webhooks, owned=lambda: sorted(self.cluster.owned))
            self.tasks.spawn(self.alarm_sender.run(), "fastjob-alarms")
            self.tasks.spawn(self._dead_man_loop(), "fastjob-dead-man")
        self.retention = Retention(self.store, cfg.retention, owned=lambda: sorted(self.cluster.owned))
        self.tasks.spawn(self.retention.run(), "fastjob-retention")
        log.info("server %s listening on %s (store %s)", server_id, self.address, cfg.db.split("@")[-1])
        return self.address

    async def stop(self) -> None:
        """Stop accepting, hand every app over to a live peer (or release it), close cleanly.

        Each app is handed over only once everything about it is written; its workers are then
        redirected to the new owner while their instances keep running."""
        if self._listener is not None:
            self._listener.close()
        if self.http is not None:
            await self.http.stop()
        await self.cluster.stop()
        for session in list(self.connections):
            session.fail(ErrorCode.SHUTTING_DOWN, "the server is stopping; reconnect to another server")
        await self.tasks.close()
        await self.scheduler.stop()
        await self.audit.flush()
        if self._listener is not None:
            await asyncio.wait({asyncio.ensure_future(self._listener.wait_closed())}, timeout=5)
        await self.store.close()
        log.info("server %s stopped", self.cluster.server_id)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return context

    # ---- sessions -----------------------------------------------------------------------
    def workers_of(self, app: str) -> list[WorkerSession]:
        return self.sessions.get(app, [])

    def session_joined(self, session: WorkerSession, running: list[int], finished: list[int],
                       second_level: list[int]) -> None:
        peers = self.sessions.setdefault(session.app, [])
        peers.append(session)
        # The worker gave up on an old connection we have not seen die yet: that session is dead,
        # and what it was running is re-attached to this one (named in this HELLO) right below.
        for old in [p for p in peers if p is not session and p.worker_id == session.worker_id
                    and p.role == session.role]:
            log.info("%s %s of app %s reconnected: closing its old session", old.role, old.worker_id, old.app)
            old.supersede()
        if session.role == "worker":
            self.scheduler.worker_joined(session, running, finished)
            self.second_level.worker_joined(session, second_level)
            self.subtasks.worker_joined(session, sorted(session.hello_tasks))

    def session_left(self, session: WorkerSession) -> None:
        peers = self.sessions.get(session.app, [])
        if session in peers:
            peers.remove(session)
        log.info("%s %s of app %s disconnected", session.role, session.worker_id, session.app,
                 extra={"app": session.app, "worker": session.worker_id})
        if session.role == "worker":
            # Stopped cleanly (DRAIN, nothing left running), it runs nothing of ours; gone any other
            # way, it may run on until its run lease is out, and a successor must know it existed.
            clean = session.draining and session.run_count == 0
            self.scheduler.worker_left(session)
            self.second_level.worker_left(session)
            self.subtasks.worker_left(session)
            keep_for = 0.0 if clean else self.config.effective_run_lease + 0.1 * self.config.heartbeat_timeout
            self.tasks.spawn(self._unregister_later(session.app, session.worker_id, keep_for),
                             f"fastjob-unregister-{session.worker_id}")

    async def _unregister_later(self, app: str, worker_id: str, delay: float) -> None:
        """Forget the worker in the registry after ``delay``, unless it came back meanwhile."""
        if delay > 0:
            await asyncio.sleep(delay)
        if not any(peer.worker_id == worker_id for peer in self.sessions.get(app, [])):
            await self.store.unregister_worker(app, worker_id, self.cluster.server_id)

    def on_report(self, session: WorkerSession, kind: str, body: dict[str, Any]) -> None:
        """A worker's report on what it runs (REPORT_TYPES), to the part that tracks it."""
        if kind == "ACK":
            self.scheduler.on_ack(session, body)
        elif kind == "HELD":
            pass  # a receipt of lead fires (version 5): nothing here acts on it; START and RESULT follow
        elif kind == "START":
            self.scheduler.on_start(session, body)
        elif kind == "LOG":
            self.scheduler.on_logs(session, body)
        elif kind == "RESULT":
            self.scheduler.on_result(session, body)
        elif kind == "SL_REPORT":
            self.second_level.on_report(session, body)
        elif kind in SUBTASK_REPORTS and session.role == "worker":  # sub-tasks: workers only
            self._subtask_report(session, kind, body)

    def _subtask_report(self, session: WorkerSession, kind: str, body: dict[str, Any]) -> None:
        if kind == "TASKS":
            self.subtasks.on_tasks(session, body)
        elif kind == "TASKS_DONE":
            self.subtasks.on_done(session, body)
        elif kind == "PARK":
            self.subtasks.on_park(session, body)
        else:
            self.subtasks.on_abandon(session, body)

    async def broadcast(self, session: WorkerSession, body: dict[str, Any]) -> dict[str, Any]:
        return await self.subtasks.broadcast(session, body)

    def session_draining(self, session: WorkerSession) -> None:
        """A stopping worker: its second-level jobs and the fires waiting for a worker go elsewhere."""
        self.second_level.worker_draining(session)
        self.scheduler.worker_draining(session)

    async def register_worker(self, app: str, hello: dict[str, Any]) -> None:
        """Record that we accepted this worker (see Scheduler.app_gained: who may hold fires)."""
        info = {key: hello.get(key) for key in ("tags", "capacity", "host", "pid")}
        await self.store.register_worker(app, hello["worker_id"], self.cluster.server_id, time.time(), info)

    async def _app_gained(self, app: str, epoch: int, origin: Origin) -> None:
        await self.scheduler.app_gained(app, epoch, origin)
        await self.second_level.app_gained(app, fresh=origin.prev_owner is None)

    async def _app_lost(self, app: str) -> None:
        await self.second_level.stats.flush()  # what its workers reported is kept for the next owner
        self.second_level.app_lost(app)
        self.subtasks.app_lost(app)
        await self.scheduler.app_lost(app)

    async def _app_drain(self, app: str) -> bool:
        await self.second_level.stats.flush()
        return await self.scheduler.drain_app(app)

    def _app_undrain(self, app: str) -> None:
        self.scheduler.undrain(app)

    def _fire_rates(self) -> dict[str, float]:
        return self.scheduler.fire_rates()

    # ---- jobs ---------------------------------------------------------------------------
    def is_second_level(self, job: JobRow | JobSpec) -> bool:
        """Fixed rate/delay jobs faster than the threshold run on a worker, not through the WAL (but a
        broadcast, whose fire fans out to every worker through its owner)."""
        period = schedule.period_seconds(job)
        return (period is not None and period < self.config.second_level_threshold and not job.run_once
                and job.mode == "single")

    def first_fire_ms(self, job: JobRow | JobSpec, now_ms: int) -> int | None:
        """When a new, re-scheduled or resumed job fires first here; None when the server never
        fires it (API-triggered, or run by a worker: second-level jobs have no next fire)."""
        return None if self.is_second_level(job) else schedule.first_fire_ms(job, now_ms)

    async def declare_jobs(self, app: str, specs: list[JobSpec]) -> int:
        """A worker's declarations (one store transaction); returns how many jobs changed."""
        now_ms = schedule.now_ms()
        written = await self.store.declare_jobs(app, specs, lambda spec: self.first_fire_ms(spec, now_ms), time.time())
        for job in written:
            self._job_changed(job)
        return len(written)

    def live_declarations(self, app: str) -> list[Collection[str]] | None:
        """The declared sets of the app's live workers; None if there is none, or one is still declaring."""
        sets: list[Collection[str]] = []
        for session in self.workers_of(app):
            if session.role != "worker" or session.closed:
                continue
            if session.declared is None:
                return None
            sets.append(session.declared)
        return sets or None

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reconciler.interval)
            try:
                await self.reconciler.check(time.time())
            except StoreError as exc:
                log.warning("reconciling declared jobs: database unavailable: %s", exc)

    async def upsert_job(self, spec: JobSpec) -> JobRow:
        job = await self.store.upsert_job(spec, self.first_fire_ms(spec, schedule.now_ms()), time.time())
        self._job_changed(job)
        return job

    def owns(self, app: str) -> bool:
        return app in self.cluster.owned

    async def trigger(self, app: str, job: JobRow, params: Any, force: bool = False) -> InstanceRow:
        return await self.scheduler.trigger(app, job, params, force)

    async def flush_statuses(self) -> None:
        """Write every status, log line and second-level report received so far (a query then sees them)."""
        await self.scheduler.writer.flush()
        await self.second_level.stats.flush()

    async def reload_job(self, job_id: int) -> None:
        job = await self.store.get_job(job_id)
        if job is not None:
            self._job_changed(job)

    def _job_changed(self, job: JobRow) -> None:
        self.scheduler.job_changed(job)
        self.second_level.job_changed(job)

    def _instance_link(self, instance_id: int) -> str:
        http = self.cluster.http_address if self.http is not None else ""
        return f"http://{http}/api/v1/instances/{instance_id}" if http else ""

    def _cluster_alarm(self, event: str, app: str, key: str, text: str) -> None:
        rows = self.alarm_rules.cluster_event(event, app, key, text)
        if rows:
            self.tasks.spawn(self.store.add_alarms(rows), f"fastjob-alarm-{event}")

    async def _dead_man_loop(self) -> None:
        """Every few seconds: jobs of our apps with a dead-man alarm and no success within it."""
        gained: dict[str, float] = {}
        while True:
            await asyncio.sleep(DEAD_MAN_CHECK)
            now = time.time()
            owned = self.cluster.owned
            for app in list(gained):
                if app not in owned:
                    del gained[app]  # gained again later: its jobs' clocks start over then
            for app in owned:
                gained.setdefault(app, now)  # a job's clock starts when we got its app, at the latest
            jobs = [job for job in self.scheduler.jobs.values() if job.app in owned]
            self.scheduler.writer.alarms(self.alarm_rules.dead_men(jobs, since=lambda job: max(
                job.updated_time, gained[job.app], self._last_worker_run(job))))

    def _last_worker_run(self, job: JobRow) -> float:
        """When a worker-run job last ran, by its workers' reports (0: never): their successes do not
        pass through the scheduler, so a dead-man alarm watches that it runs at all."""
        stats = self.second_level.stats.totals(job)
        return float((stats or {}).get("last_run_at") or 0.0)

    async def _token_watch(self) -> None:
        """Close the sessions of tokens revoked or expired since their HELLO (checked every few seconds)."""
        while True:
            await asyncio.sleep(VERIFY_CACHE_SECONDS)
            for session in list(self.connections):
                token_id = session.principal.token_id
                try:
                    valid = token_id is None or await self.auth.still_valid(token_id)
                except StoreError:
                    break  # the database is away: check again next time
                if not valid:
                    log.warning("%s %s of app %s: its token %s was revoked or expired; closing", session.role,
                                session.worker_id, session.app, token_id)
                    session.fail(ErrorCode.BAD_TOKEN, "the session's token was revoked or expired")

    async def _first_admin_token(self) -> None:
        """On a first start (no token that can use the API), create an admin token and show it once."""
        if await self.auth.any_usable():
            return
        token, row = await self.auth.create("admin (first start)", "admin")
        log.warning("no API token existed: created admin token %s; it is shown once, on the line below"
                    " (fastjob-server token create makes more)", row.id)
        print(f"FASTJOB_ADMIN_TOKEN {token}", flush=True)

    # ---- what the admin API needs (http/backend.py: AdminBackend) ------------------------------
    @property
    def server_id(self) -> str:
        return self.cluster.server_id

    def owned_apps(self) -> dict[str, int]:
        return dict(self.cluster.owned)

    def ready(self) -> tuple[bool, str]:
        if not self.cluster.lease_valid():
            return False, "this server's lease is not valid (database heartbeat late)"
        return True, ""

    async def owner_of(self, app: str, claim: bool) -> Owner | None:
        """Where actions on ``app`` are applied; with ``claim``, an app with no live owner is claimed
        first (as a worker's HELLO would), so that jobs can be defined before any worker connects."""
        for _ in range(3):
            if app in self.cluster.owned:
                return Owner(True)
            row = await self.store.get_app(app)
            live = await self.cluster.live_servers()
            if row is not None and row.owner in live:
                owner = live[row.owner]
                if owner.id == self.server_id:
                    await self.cluster.route(app)  # assigned to us, not loaded yet
                    continue
                return Owner(False, owner.http_address, owner.id)
            if not claim:
                return None
            await self.cluster.route(app)
        raise StoreError(f"app {app}: ownership did not settle")

    def kill(self, row: InstanceRow, job: JobRow | None) -> Status:
        return self.scheduler.interventions.kill(row, job)

    async def retry(self, row: InstanceRow, job: JobRow, force: bool, params: Any) -> InstanceRow:
        return await self.scheduler.interventions.retry(row, job, force, params)

    def overlap_refusal(self, job: JobRow) -> str | None:
        return self.scheduler.interventions.overlap_refusal(job)

    async def metrics_text(self) -> bytes:
        """This server's /metrics (the unfinished-instance counts are read at most every 5 s)."""
        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(ServerCollector(self.metrics, Gauges(
                wheel_pending=lambda: len(self.scheduler.wheel_handles),
                workers=lambda: {app: sum(1 for s in peers if s.role == "worker" and s.established)
                                 for app, peers in self.sessions.items()},
                owned_apps=lambda: len(self.cluster.owned),
                writer_queue=self.scheduler.writer.queued,
                instances=lambda: self._unfinished[1],
                subtasks=self.subtasks.open_counts)))
            self._registry.register(ProcessCollector(registry=None))
        if time.monotonic() - self._unfinished[0] > 5.0:
            try:
                counts = [(app, status, n) for app in sorted(self.cluster.owned)
                          for status, n in (await self.store.count_unfinished(app)).items()]
            except StoreError:
                counts = self._unfinished[1]  # the database is away: the last counts, and the store's errors
            self._unfinished = (time.monotonic(), counts)
        return bytes(generate_latest(self._registry))
