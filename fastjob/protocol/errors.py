"""Error codes and the exceptions of the wire protocol.

Everything else in the package raises these, and the server and worker catch them, so they sit
at the bottom of the package's imports.
"""
from __future__ import annotations


class ErrorCode:
    """Error codes carried in ERROR.code and REJECT.code (plain strings on the wire)."""

    BAD_FRAME = "bad_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    BAD_TOKEN = "bad_token"
    NOT_OWNER = "not_owner"
    NOT_FOUND = "not_found"
    INVALID = "invalid"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    SHUTTING_DOWN = "shutting_down"
    SLOW_CONSUMER = "slow_consumer"
    BUSY = "busy"
    FORBIDDEN = "forbidden"  # version 4: the session's token may not make this call


class ProtocolError(Exception):
    """The peer broke the protocol (or a local frame would); ``code`` is an :class:`ErrorCode`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteError(Exception):
    """The peer answered a request with ERROR."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
