"""Run a module under cProfile timed in CPU seconds, and write its stats when it exits.

    python bench/_profiled.py OUT -m MODULE [ARGS...]

``python -m cProfile`` times in wall-clock seconds, so an event loop waiting for I/O would top
its table; CPU time (time.process_time, all threads of the process) leaves the waiting out.
bench_profile.py starts fastjob-server this way when py-spy cannot attach.
"""
from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        raise SystemExit(__doc__)
    out, module = sys.argv[1], sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    profiler = cProfile.Profile(time.process_time)
    try:
        profiler.runcall(runpy.run_module, module, run_name="__main__", alter_sys=True)
    finally:
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
