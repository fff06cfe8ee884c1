"""FastJob: a distributed, lock-free job scheduler."""
__version__ = "0.1.0"
