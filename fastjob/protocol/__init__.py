"""FastJob wire protocol: length-prefixed msgpack frames over TCP (optionally TLS).

``protocol.md`` at the repository root is the normative specification; this package is its
Python implementation and is shared by the server and the worker. One module per job:

* :mod:`.constants` - protocol versions and default limits;
* :mod:`.errors` - :class:`ErrorCode`, :class:`ProtocolError`, :class:`RemoteError`;
* :mod:`.schema` - the message schemas (:data:`SCHEMAS` / :data:`STRUCTS`) and :func:`validate`;
* :mod:`.codec` - framing: :func:`encode` and the incremental :class:`Decoder`;
* :mod:`.connection` - :class:`Connection`, the :class:`asyncio.Protocol` base.

Everything public is re-exported here: import it from ``fastjob.protocol``.
"""
from __future__ import annotations

from .codec import HEADER, Decoder, Message, encode, parse_address
from .connection import TRAFFIC, Connection
from .constants import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_FRAME,
    KILL_REASON,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    WITHDRAW_REASON,
)
from .errors import ErrorCode, ProtocolError, RemoteError
from .schema import REPLY_TYPES, SCHEMAS, SINCE_VERSION, STRUCTS, negotiate_version, validate

__all__ = [
    "TRAFFIC",
    "KILL_REASON",
    "WITHDRAW_REASON",
    "PROTOCOL_VERSION",
    "MIN_PROTOCOL_VERSION",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "HEADER",
    "Message",
    "ErrorCode",
    "ProtocolError",
    "RemoteError",
    "REPLY_TYPES",
    "SCHEMAS",
    "SINCE_VERSION",
    "STRUCTS",
    "encode",
    "validate",
    "Decoder",
    "Connection",
    "negotiate_version",
    "parse_address",
]
