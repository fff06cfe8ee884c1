"""Message schemas and their validation.

``protocol.md`` carries the same tables as :data:`SCHEMAS` / :data:`STRUCTS`, as small type
strings, so that the tests can check that the specification and the code agree. The tables
are compiled once, at import, into checkers: :func:`validate` uses them, and so does the
decoder for every incoming frame.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from ..models import job_wire_fields
from .constants import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from .errors import ErrorCode, ProtocolError

# --------------------------------------------------------------------------------------
# Schemas. Type strings: int, float (int accepted), str, bool, any, map, array,
# array[T], a STRUCTS name, "T|nil". A trailing "?" marks an optional field.
# protocol.md carries the same tables; tests/test_protocol.py checks they agree.
# --------------------------------------------------------------------------------------

STRUCTS: dict[str, Any] = {
    # a map struct is a dict of fields; a tuple struct (fixed-length array) is a list of types
    "log_line": ["float", "str", "str"],
    "sl_job": {
        "id": "int",
        "name": "str",
        "handler": "str",
        "schedule_type": "str",
        "period": "float",
        "params": "any",
        "timeout": "float|nil",
        "allow_overlap": "bool",
        "version": "int",
        "anchor": "float?",
        "last_run_at": "float?",
    },
    "sl_report": {
        "job_id": "int",
        "runs": "int",
        "failures": "int",
        "last_error": "str|nil",
        "last_run_at": "float|nil",
        "lateness_p50": "float",
        "lateness_p99": "float",
        "lateness_max": "float",
        "skipped": "int?",
        "since": "float?",
        "sampled": "array[sl_run]?",
        "logs_dropped": "int?",
    },
    "sl_run": {
        "planned_at": "float",
        "started_at": "float",
        "duration": "float",
        "status": "str",
        "error": "str|nil",
        "logs": "array[log_line]",
    },
    # a job declaration: the model's fields (fastjob/models.py), plus version 1's overlap boolean
    "job_def": {**job_wire_fields(), "allow_overlap": "bool?"},
}

SCHEMAS: dict[str, dict[str, str]] = {
    # handshake
    "HELLO": {
        "version": "int",
        "app": "str",
        "worker_id": "str",
        "role": "str?",
        "token": "str|nil?",
        "tags": "array[str]?",
        "capacity": "int?",
        "running": "array[int]?",
        "finished": "array[int]?",
        "second_level": "array[int]?",
        "host": "str?",
        "pid": "int?",
        "handlers": "map?",
        "leading": "array[int]?",
        "tasks": "array[str]?",
    },
    "WELCOME": {
        "version": "int",
        "server_id": "str",
        "heartbeat_interval": "float",
        "heartbeat_timeout": "float",
        "max_frame": "int",
        "run_lease": "float?",
    },
    "REDIRECT": {"address": "str", "server_id": "str?", "retry_in": "float?"},
    "REJECT": {"code": "str", "reason": "str"},
    # liveness
    "PING": {"ts": "float?", "running": "int?"},
    "PONG": {"ts": "float?", "lease": "bool?", "now": "float?"},
    "DRAIN": {"reason": "str?"},
    # regular jobs
    "DISPATCH": {
        "instance_id": "int",
        "job_id": "int",
        "job": "str",
        "handler": "str",
        "params": "any",
        "attempt": "int",
        "scheduled_at": "float",
        "timeout": "float|nil",
        "start_at": "float?",
        "trigger_params": "any?",
        "mode": "str?",
        "min_success": "float?",
        "tags": "array[str]?",
    },
    "ACK": {"instance_id": "int", "accepted": "bool", "reason": "str?"},
    "HELD": {"instance_ids": "array[int]"},
    "START": {"instance_id": "int", "started_at": "float"},
    "LOG": {"instance_id": "int", "lines": "array[log_line]"},
    "RESULT": {
        "instance_id": "int",
        "status": "str",
        "result": "any?",
        "error": "str?",
        "started_at": "float?",
        "finished_at": "float",
    },
    "CANCEL": {"instance_id": "int", "reason": "str?"},
    # second-level jobs
    "SL_ASSIGN": {"job": "sl_job", "lease": "float"},
    "SL_REVOKE": {"job_id": "int", "reason": "str?"},
    "SL_REPORT": {"reports": "array[sl_report]"},
    # sub-tasks (version 6): ctx.map batches, broadcast sub-runs, workflow steps
    "TASKS": {
        "parent": "str",
        "call": "int",
        "start": "int",
        "handler": "str",
        "items": "array",
        "attempt": "int?",
        "retries": "int?",
        "timeout": "float|nil?",
        "job": "str?",
        "upstream": "map?",
    },
    "BROADCAST": {
        "parent": "str",
        "call": "int",
        "handler": "str",
        "params": "any",
        "tags": "array[str]?",
        "attempt": "int?",
        "timeout": "float|nil?",
    },
    "PARK": {"parent": "str", "waiting": "bool"},
    "RUN_TASKS": {
        "key": "str",
        "handler": "str",
        "items": "array",
        "start": "int",
        "attempt": "int",
        "retries": "int?",
        "timeout": "float|nil?",
        "only": "array[int]?",
        "shard": "array[int]?",
        "upstream": "map?",
        "job": "str?",
    },
    "TASKS_DONE": {
        "key": "str",
        "results": "array?",
        "errors": "array?",
        "logs": "array[log_line]?",
        "refused": "str?",
    },
    "TASKS_ABANDON": {"parent": "str", "reason": "str?"},
    "TASKS_STOP": {"key": "str", "reason": "str?"},
    "TASK_RESULTS": {
        "parent": "str",
        "call": "int",
        "start": "int",
        "results": "array",
        "errors": "array?",
    },
    # client API
    "JOB_UPSERT": {"job": "job_def"},
    # each a job_def, checked once, by the server's job rules (server/api.py), naming the job at fault
    "JOB_DECLARE": {"jobs": "array[map]", "final": "bool"},
    "JOB_DELETE": {"name": "str"},
    "JOB_ENABLE": {"name": "str", "enabled": "bool"},
    "JOB_GET": {"name": "str"},
    "JOB_LIST": {},
    "TRIGGER": {"name": "str", "params": "any?"},
    "INSTANCE_GET": {"instance_id": "int"},
    "INSTANCE_LIST": {"job": "str?", "status": "array[str]?", "limit": "int?"},
    "LOG_GET": {"instance_id": "int", "limit": "int?"},
    "RUN_LIST": {"job": "str", "limit": "int?"},
    # generic
    "RESPONSE": {},
    "ERROR": {"code": "str", "message": "str", "fatal": "bool?"},
}

#: Message types added after version 1, with the version that defines them: a peer must not
#: send one on a connection that negotiated an older version (the receiver: ``unknown_type``).
SINCE_VERSION: dict[str, int] = {"DRAIN": 2, "JOB_DECLARE": 3, "RUN_LIST": 3, "HELD": 5, "TASKS": 6, "BROADCAST": 6,
                                  "PARK": 6, "RUN_TASKS": 6, "TASKS_DONE": 6, "TASK_RESULTS": 6, "TASKS_ABANDON": 6,
                                  "TASKS_STOP": 6}

REPLY_TYPES = frozenset({"RESPONSE", "ERROR", "WELCOME", "REDIRECT", "REJECT"})
"""Types that answer a request (they carry the request's rid)."""

# Compiled form: a map checker is a tuple of (name, allowed python types or None for any,
# required, sub-checker or None). Exact type() membership keeps bool out of int and vice versa.
_BASE_TYPES: dict[str, frozenset[type] | None] = {
    "int": frozenset({int}),
    "float": frozenset({float, int}),
    "str": frozenset({str}),
    "bool": frozenset({bool}),
    "map": frozenset({dict}),
    "array": frozenset({list, tuple}),
    "any": None,
}
_Check = Callable[[Any, str], None]
_MISSING = object()


def _type_name(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


def _compile_type(spec: str) -> tuple[frozenset[type] | None, _Check | None]:
    """Turn a type string into (allowed types, deep checker) for the validator."""
    nullable = spec.endswith("|nil")
    if nullable:
        spec = spec[:-4]
    sub: _Check | None = None
    if spec in _BASE_TYPES:
        types = _BASE_TYPES[spec]
    elif spec.startswith("array[") and spec.endswith("]"):
        types = _BASE_TYPES["array"]
        sub = _array_checker(*_compile_type(spec[6:-1]), spec[6:-1])
    elif spec in STRUCTS:
        struct_spec = STRUCTS[spec]
        if isinstance(struct_spec, dict):
            types = _BASE_TYPES["map"]
            sub = _map_checker(_compile_fields(struct_spec))
        else:
            types = _BASE_TYPES["array"]
            sub = _tuple_checker([_compile_type(s) + (s,) for s in struct_spec])
    else:
        raise ValueError(f"unknown type in schema: {spec!r}")
    if nullable and types is not None:
        types = types | {type(None)}
    return types, sub


def _compile_fields(fields: dict[str, str]) -> tuple[Any, ...]:
    out = []
    for name, spec in fields.items():
        required = not spec.endswith("?")
        spec = spec.rstrip("?")
        types, sub = _compile_type(spec)
        out.append((name, types, required, sub, spec))
    return tuple(out)


def _bad(path: str, spec: str, value: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, f"{path}: expected {spec}, got {_type_name(value)}")


def _check_fields(body: dict[str, Any], fields: tuple[Any, ...], path: str) -> None:
    get = body.get
    for name, types, required, sub, spec in fields:
        value = get(name, _MISSING)
        if value is _MISSING or (value is None and not required):
            if required:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{path}.{name}: required field missing")
            continue  # optional and absent (nil counts as absent)
        if types is not None and type(value) not in types:
            raise _bad(f"{path}.{name}", spec, value)
        if sub is not None and value is not None:
            sub(value, f"{path}.{name}")


def _map_checker(fields: tuple[Any, ...]) -> _Check:
    """A struct's checker. Whether a map passes the field checks depends only on the exact types
    of its fields, so the type tuples of maps that passed are kept: a JOB_DECLARE of 1,000 job
    maps of a few shapes costs a set lookup per map, plus the checks of their nested values."""
    names = tuple(name for name, *_ in fields)
    nested = tuple((name, sub) for name, _, _, sub, _ in fields if sub is not None)
    passed: set[tuple[type, ...]] = set()

    def check(value: Any, path: str) -> None:
        found = tuple(map(type, map(value.get, names, itertools.repeat(_MISSING))))
        if found not in passed:
            _check_fields(value, fields, path)
            if len(passed) < 256:
                passed.add(found)
            return
        for name, sub in nested:
            item = value.get(name)
            if item is not None:
                sub(item, f"{path}.{name}")

    return check


def _array_checker(types: frozenset[type] | None, sub: _Check | None, spec: str) -> _Check:
    def check(value: Any, path: str) -> None:
        for i, item in enumerate(value):
            if types is not None and type(item) not in types:
                raise _bad(f"{path}[{i}]", spec, item)
            if sub is not None and item is not None:
                sub(item, f"{path}[{i}]")

    return check


def _tuple_checker(items: list[Any]) -> _Check:
    def check(value: Any, path: str) -> None:
        if len(value) != len(items):
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"{path}: expected {len(items)} items, got {len(value)}"
            )
        for i, (item, (types, sub, spec)) in enumerate(zip(value, items, strict=True)):
            if types is not None and type(item) not in types:
                raise _bad(f"{path}[{i}]", spec, item)
            if sub is not None and item is not None:
                sub(item, f"{path}[{i}]")

    return check


_COMPILED: dict[str, tuple[Any, ...]] = {name: _compile_fields(fields) for name, fields in SCHEMAS.items()}


def _fast_checker(fields: tuple[Any, ...], path: str) -> Callable[[dict[str, Any]], None] | None:
    """Compile a schema into one boolean expression over the body (the hot path).

    Why generated code: a DISPATCH is checked for every frame, and a straight-line expression
    costs a fraction of the generic loop. When the expression says "wrong", the generic
    :func:`_check_fields` runs to raise a precise error, so both always agree.
    """
    if not fields:
        return None
    env: dict[str, Any] = {"M": _MISSING, "slow": _check_fields, "fields": fields, "path": path,
                           "ProtocolError": ProtocolError, "BAD": ErrorCode.BAD_MESSAGE}
    tests: list[str] = []
    subs: list[str] = []
    for i, (name, types, required, sub, _spec) in enumerate(fields):
        if types is None:
            if required:
                tests.append(f"{name!r} not in body")
        else:
            # a missing required field reads as M (never allowed), a missing optional one as None
            allowed = types if required else types | {type(None)}
            value = f"get({name!r}, M)" if required else f"get({name!r})"
            if len(allowed) == 1:
                env[f"T{i}"] = next(iter(allowed))
                tests.append(f"type({value}) is not T{i}")
            else:
                env[f"T{i}"] = allowed
                tests.append(f"type({value}) not in T{i}")
        if sub is not None:
            env[f"S{i}"] = sub
            subs.append(f"    v = get({name!r})\n    if v is not None: S{i}(v, {path + '.' + name!r})\n")
    source = "def check(body):\n    get = body.get\n"
    if tests:
        source += "    if " + " or ".join(tests) + ":\n"
        source += "        slow(body, fields, path)\n"
        source += "        raise ProtocolError(BAD, path)  # unreachable: slow() raised\n"
    source += "".join(subs)
    exec(compile(source, f"<schema {path}>", "exec"), env)
    checker: Callable[[dict[str, Any]], None] = env["check"]
    return checker


_CHECKERS: dict[str, Callable[[dict[str, Any]], None] | None] = {
    name: _fast_checker(fields, name) for name, fields in _COMPILED.items()
}


def validate(type: str, body: Any) -> None:
    """Check ``body`` against the schema of ``type``; raise :class:`ProtocolError` if it is wrong.

    Unknown extra fields are ignored (forward compatibility); optional fields may be nil.
    """
    if type not in _CHECKERS:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {type!r}")
    check = _CHECKERS[type]
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{type}: body must be a map")
    if check is not None:
        check(body)


def negotiate_version(client_version: int) -> int | None:
    """The version to answer in WELCOME, or None when the client is too old (REJECT)."""
    version = min(client_version, PROTOCOL_VERSION)
    return version if version >= MIN_PROTOCOL_VERSION else None

