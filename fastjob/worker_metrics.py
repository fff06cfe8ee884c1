"""A worker's own /metrics (``Worker(metrics_port=...)``): its runs by outcome, what it runs now.

Served by prometheus_client's small HTTP server on a thread of its own, bound to 127.0.0.1 unless
told otherwise; it reads plain counters the worker keeps, so a run costs no lock.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class WorkerCollector(Collector):
    def __init__(self, app: str, outcomes: collections.Counter[str], running: Callable[[], int],
                 second_level: Callable[[], int]) -> None:
        self.app = app
        self.outcomes = outcomes
        self.running = running
        self.second_level = second_level

    def collect(self) -> Iterator[Metric]:
        runs = CounterMetricFamily("fastjob_worker_runs", "Instances this worker ran, by outcome.",
                                   labels=["app", "outcome"])
        for outcome, n in list(self.outcomes.items()):  # a copy: the worker's loop adds outcomes meanwhile
            runs.add_metric([self.app, outcome], float(n))
        yield runs
        yield GaugeMetricFamily("fastjob_worker_running", "Instances running on this worker now.",
                                value=float(self.running()))
        yield GaugeMetricFamily("fastjob_worker_second_level_jobs", "Worker-run jobs this worker runs now.",
                                value=float(self.second_level()))


def serve_metrics(collector: Collector, port: int, host: str = "127.0.0.1") -> tuple[Any, int]:
    """Start serving; returns (the HTTP server, to shut down; the bound port)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_address[1])
