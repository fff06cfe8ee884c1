"""The HTTP admin API (aiohttp), served by every fastjob-server: see routes.py for its routes."""
from __future__ import annotations

from .backend import AdminBackend, Owner
from .service import AdminHttp

__all__ = ["AdminBackend", "AdminHttp", "Owner"]
