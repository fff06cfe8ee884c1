"""Build the compiled timing wheel and cron evaluator.

A failed compile is an error, never a silent fall back to the pure-Python twin
(msgpack-python's rule); set FASTJOB_PUREPYTHON=1 at run time to use the twin.
"""
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "fastjob._timewheel",
        ["fastjob/_timewheel.pyx"],
        extra_compile_args=["-O3"],
    ),
    # The cron evaluator (fastjob/cron.py); its pure-Python twin is fastjob/_cron_py.py.
    Extension("fastjob._cron", ["fastjob/_cron.pyx"], extra_compile_args=["-O3"]),
]
if sys.platform.startswith("linux"):
    # Sub-millisecond wake-ups for the timer driver (fastjob/timer.py); elsewhere it uses loop timers.
    extensions.append(Extension("fastjob._timerfd", ["fastjob/_timerfd.pyx"], extra_compile_args=["-O2"]))

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
