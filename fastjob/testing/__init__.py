"""Test support shipped with FastJob, as asyncpg ships its cluster harness.

* :mod:`.processes`: real server processes on free local ports, always cleaned up.
* :mod:`.fake_time`: a clock and timer that move only when a test says so, for rule tests of
  the scheduler's parts in one process.
"""
from .fake_time import FakeClock, FakeTimer, settle
from .processes import FAST_CLUSTER_ARGS, ServerFactory, ServerProcess, next_event, wait_until

__all__ = [
    "FAST_CLUSTER_ARGS", "FakeClock", "FakeTimer", "ServerFactory", "ServerProcess", "next_event", "settle",
    "wait_until",
]
