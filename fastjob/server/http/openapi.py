"""The OpenAPI 3 document of the admin API, built from the route table and the job model."""
from __future__ import annotations

import re
from typing import Any

from ... import __version__, jobdef
from ..auth import ROLES
from .routes import ROUTES

_JSON_TYPES: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array"}
_QUERY_DOCS = {
    "cursor": "the next_cursor of the previous page",
    "limit": "items per page (at most 1000)",
    "since": "planned at or after (epoch seconds or ISO 8601)",
    "until": "planned before (epoch seconds or ISO 8601)",
    "status": "statuses, comma-separated",
    "job": "a job name",
    "app": "an app name",
    "next": "how many next fire times to list",
    "window": "like 15m, 1h, 7d",
    "follow": "1: a live tail as server-sent events",
    "offset": "lines to skip (the next page)",
    "name": "a part of the job name",
    "tag": "a tag the job carries",
    "enabled": "true or false",
}


def _field_schema(kinds: tuple[type, ...]) -> dict[str, Any]:
    if object in kinds:
        return {}
    types = sorted({_JSON_TYPES.get(kind, "number") for kind in kinds if kind is not type(None)})
    schema: dict[str, Any] = {"type": types[0]} if len(types) == 1 else {"oneOf": [{"type": t} for t in types]}
    if type(None) in kinds:
        schema["nullable"] = True
    if schema.get("type") == "array":
        schema["items"] = {"type": "string"}
    return schema


def _schemas() -> dict[str, Any]:
    job_props = {name: _field_schema(kinds) for name, kinds in jobdef.FIELD_TYPES.items()}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
        "Job": {"type": "object", "required": ["name"], "properties": job_props, "additionalProperties": False,
                "description": "The keyword arguments of Worker.schedule(); give at most one of "
                               + ", ".join(jobdef.SCHEDULE_KEYS)},
        "JobPatch": {"type": "object", "properties": job_props, "additionalProperties": False},
        "Trigger": {"type": "object", "properties": {"params": {}, "force": {"type": "boolean"}}},
        "Retry": {"type": "object", "properties": {"params": {}, "force": {"type": "boolean"}}},
        "StepSucceed": {"type": "object", "properties": {"result": {}}},
        "Drain": {"type": "object", "properties": {"undo": {"type": "boolean"}}},
        "TokenCreate": {"type": "object", "required": ["name", "role"], "properties": {
            "name": {"type": "string"}, "role": {"type": "string", "enum": list(ROLES)},
            "apps": {"type": "array", "items": {"type": "string"}}, "expires_in": {"type": "number"}}},
    }


def build_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", route.path)]
        params += [{"name": name, "in": "query", "required": False, "schema": {"type": "string"},
                    "description": _QUERY_DOCS.get(name, name)} for name in route.query]
        if route.action == "job.trigger":
            params.append({"name": "Idempotency-Key", "in": "header", "required": False,
                           "schema": {"type": "string", "maxLength": 128}})
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": f"{route.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', route.path.lower()).strip('_')}",
            "parameters": params,
            "responses": {str(route.success): {"description": "success", "content": {
                "application/json": {"schema": {"type": "object"}},
                **({"text/event-stream": {"schema": {"type": "string"}}} if route.streams else {})}},
                "default": {"description": "an error", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}}},
        }
        if route.permission is None:
            operation["security"] = []
        else:
            operation["x-fastjob-permission"] = route.permission.value
        if route.body is not None:
            operation["requestBody"] = {"required": route.body in ("Job", "TokenCreate"), "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}}}
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "FastJob admin API", "version": __version__,
                 "description": "Roles: viewer (read), operator (trigger, pause, resume, kill, retry), admin"
                                " (jobs, tokens, servers); worker tokens declare, trigger and read. Each is global"
                                " or scoped to apps."},
        "paths": paths,
        "components": {"schemas": _schemas(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
