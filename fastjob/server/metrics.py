"""Prometheus metrics: plain counters on the hot path, read by prometheus_client at scrape time.

prometheus_client's own Counter and Histogram take a lock on every increment; a fire costs
several of them. Here the scheduler bumps plain ints and lists (one event loop thread, so no
lock is needed), and :class:`ServerCollector` turns them into metric families only when
``/metrics`` is scraped. Label values are bounded: the app, an outcome or status, a store
operation's name, an ownership change's kind; never a job name or an instance id.
"""
from __future__ import annotations

import collections
from bisect import bisect_left as _bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..protocol import TRAFFIC

#: Seconds: lateness (planned to started), dispatch to start.
LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Seconds: a run's duration, and a store operation's.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0, 1800.0)


@dataclass(slots=True)
class Histogram:
    """Counts per bucket (the last one is +Inf), their sum and their number."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[_bisect(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative buckets, as the exposition format wants them."""
        out, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


class Histograms(dict[str, Histogram]):
    """One histogram per label value, made on first use."""

    def __init__(self, bounds: Sequence[float]) -> None:
        super().__init__()
        self.bounds = bounds

    def observe(self, label: str, value: float) -> None:
        """One observation (a few attribute reads and two additions: it runs for every fire)."""
        histogram = self.get(label) or self.setdefault(label, Histogram(self.bounds))
        histogram.counts[_bisect(self.bounds, value)] += 1
        histogram.total += value


class Metrics:
    """What the server counts as it works (each part gets this object and bumps its fields)."""

    def __init__(self) -> None:
        self.fires: collections.Counter[tuple[str, str]] = collections.Counter()  # (app, final status)
        self.lateness = Histograms(LATENESS_BUCKETS)  # by app: planned to started
        self.dispatch_to_start = Histograms(LATENESS_BUCKETS)  # by app
        self.run_duration = Histograms(DURATION_BUCKETS)  # by app
        self.ownership_changes: collections.Counter[str] = collections.Counter()  # by kind
        self.store_seconds = Histograms(DURATION_BUCKETS)  # by operation
        self.store_errors: collections.Counter[str] = collections.Counter()  # by operation
        self.sl_runs: collections.Counter[tuple[str, str]] = collections.Counter()  # (app, runs/failures/skipped)
        #: job id -> (app, lateness p50, p99) of its latest report (labels: the app, never the job)
        self.sl_lateness: dict[int, tuple[str, float, float]] = {}
        self.subtask_items: collections.Counter[tuple[str, str]] = collections.Counter()  # (app, outcome)
        #: (app, event): "sent" to a worker, "resent" after its worker was lost or refused it
        self.subtask_batches: collections.Counter[tuple[str, str]] = collections.Counter()

    def store_op(self, what: str, seconds: float, ok: bool) -> None:
        """The store's observer: every operation's time, and its failures."""
        self.store_seconds.observe(what, seconds)
        if not ok:
            self.store_errors[what] += 1


@dataclass(frozen=True, slots=True)
class Gauges:
    """What is read of the server's state at scrape time."""

    wheel_pending: Callable[[], int]
    workers: Callable[[], dict[str, int]]  # connected workers by app
    owned_apps: Callable[[], int]
    writer_queue: Callable[[], int]
    instances: Callable[[], list[tuple[str, str, int]]]  # (app, unfinished status, count), refreshed before
    subtasks: Callable[[], dict[tuple[str, str], int]] = dict  # (app, waiting/running) -> batches tracked


class ServerCollector(Collector):
    """The families of one server's /metrics."""

    def __init__(self, metrics: Metrics, gauges: Gauges) -> None:
        self.metrics = metrics
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        m, g = self.metrics, self.gauges
        yield _counter("fastjob_fires", "Fires that reached a final status, by app and outcome.",
                       ["app", "outcome"], {key: float(n) for key, n in m.fires.items()})
        yield _histograms("fastjob_fire_lateness_seconds", "From a fire's planned time to its handler's start.",
                          "app", m.lateness)
        yield _histograms("fastjob_dispatch_to_start_seconds", "From sending a fire to its worker to its start.",
                          "app", m.dispatch_to_start)
        yield _histograms("fastjob_run_duration_seconds", "A handler's run, start to finish.", "app",
                          m.run_duration)
        yield _gauge("fastjob_instances", "Unfinished instances of the apps this server owns, by status.",
                     ["app", "status"], {(app, status): float(n) for app, status, n in g.instances()})
        yield _gauge("fastjob_wheel_pending_fires", "Fires waiting in this server's timing wheel.", [],
                     {(): float(g.wheel_pending())})
        yield _gauge("fastjob_connected_workers", "Workers connected to this server, by app.", ["app"],
                     {(app,): float(n) for app, n in g.workers().items()})
        yield _gauge("fastjob_owned_apps", "Apps this server owns.", [], {(): float(g.owned_apps())})
        yield _counter("fastjob_subtask_items", "Sub-task items (maps, broadcast sub-runs, workflow steps) recorded,"
                       " by app and outcome.", ["app", "outcome"],
                       {key: float(n) for key, n in m.subtask_items.items()})
        yield _counter("fastjob_subtask_batches", "Sub-task batches sent to workers, by app and event (sent, resent:"
                       " after their worker was lost or refused them).", ["app", "event"],
                       {key: float(n) for key, n in m.subtask_batches.items()})
        yield _gauge("fastjob_subtask_batches_open", "Sub-task batches this server tracks, by app and state"
                     " (waiting for a worker, running).", ["app", "state"],
                     {key: float(n) for key, n in g.subtasks().items()})
        yield _counter("fastjob_ownership_changes", "Apps this server gained or gave up, by kind.", ["kind"],
                       {(kind,): float(n) for kind, n in m.ownership_changes.items()})
        yield _histograms("fastjob_store_operation_seconds", "Store operations, by name (retries included).",
                          "operation", m.store_seconds)
        yield _counter("fastjob_store_errors", "Store operations that failed after their retries.", ["operation"],
                       {(op,): float(n) for op, n in m.store_errors.items()})
        yield _gauge("fastjob_status_writer_queue", "Status changes and log lines waiting to be written.", [],
                     {(): float(g.writer_queue())})
        frames_in, bytes_in, frames_out, bytes_out = TRAFFIC
        yield _counter("fastjob_protocol_frames", "Wire protocol frames, by direction.", ["direction"],
                       {("in",): float(frames_in), ("out",): float(frames_out)})
        yield _counter("fastjob_protocol_bytes", "Wire protocol bytes, by direction.", ["direction"],
                       {("in",): float(bytes_in), ("out",): float(bytes_out)})
        yield _counter("fastjob_second_level_runs", "Runs, failures and skips of worker-run jobs, from the workers'"
                       " reports.", ["app", "kind"], {key: float(n) for key, n in m.sl_runs.items()})
        worst: dict[tuple[str, ...], float] = {}
        for app, p50, p99 in m.sl_lateness.values():
            for quantile, value in (("0.5", p50), ("0.99", p99)):
                worst[(app, quantile)] = max(value, worst.get((app, quantile), 0.0))
        yield _gauge("fastjob_second_level_lateness_seconds", "The worst lateness quantile any worker-run job of"
                     " the app reported last.", ["app", "quantile"], worst)


def _counter(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family


def _gauge(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family


def _histograms(name: str, doc: str, label: str, histograms: Histograms) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, histogram in histograms.items():
        family.add_metric([value], histogram.buckets(), histogram.total)
    return family
