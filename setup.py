"""Build the compiled timing wheel.

A failed compile is an error, never a silent fall back to the pure-Python twin
(msgpack-python's rule); set FASTJOB_PUREPYTHON=1 at run time to use the twin.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "fastjob._timewheel",
        ["fastjob/_timewheel.pyx"],
        extra_compile_args=["-O3"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
