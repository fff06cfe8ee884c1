"""Protocol versions and default limits.

Apart so that configuration (``fastjob.server.config``, the worker's arguments) can name the
defaults without pulling in the codec or the connection.
"""
from __future__ import annotations

PROTOCOL_VERSION = 6
"""The highest protocol version this implementation speaks."""
MIN_PROTOCOL_VERSION = 1
"""The lowest protocol version this implementation still accepts."""
DEFAULT_MAX_FRAME = 1 << 20
"""Default limit of one frame's payload, in bytes (1 MiB)."""
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a server waits for HELLO before closing with ``handshake_timeout``."""
KILL_REASON = "killed by an operator"
"""CANCEL's reason when an operator kills a run: a version-4 worker reports the run ``killed``."""
WITHDRAW_REASON = "withdrawn before it started"
"""CANCEL's reason when the server takes back a lead fire (version 5): the worker drops it if it has
not started, answering ACK refused, and never stops a run for it."""
