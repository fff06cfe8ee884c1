"""The FastJob server (``fastjob-server`` / ``python -m fastjob.server``)."""
from .app import FastJobServer, ServerConfig

__all__ = ["FastJobServer", "ServerConfig"]
