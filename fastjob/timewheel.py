"""The timing wheel: the compiled one, or the pure-Python twin when FASTJOB_PUREPYTHON=1.

msgpack-python's pattern: the environment override is read once at import; without it the
compiled extension must import (a missing build is an error, never a silent fallback).
"""
from __future__ import annotations

import os

__all__ = ["TimingWheel", "USING_CYTHON"]

if os.environ.get("FASTJOB_PUREPYTHON", "") not in ("", "0"):
    from ._timewheel_py import TimingWheel

    USING_CYTHON = False
else:
    # the compiled class has the same interface (_timewheel.pyi); ImportError here means: build it
    from ._timewheel import TimingWheel  # type: ignore[assignment]  # noqa: F401

    USING_CYTHON = True
