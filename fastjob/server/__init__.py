"""The FastJob server (``fastjob-server`` / ``python -m fastjob.server``)."""
from .app import FastJobServer
from .config import ServerConfig

__all__ = ["FastJobServer", "ServerConfig"]
