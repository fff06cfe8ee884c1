"""JSON answers that do not stall the event loop: a large list is encoded a slice at a time,
yielding to the loop between slices, so the scheduler's timers and frames keep flowing while an
API client reads 1,000 instances."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

#: Items encoded between two yields to the loop (about 0.2 ms of work each).
SLICE = 100
#: Lists shorter than this are encoded in one go.
SMALL = 200


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


async def encode(payload: dict[str, Any]) -> bytes:
    """``payload`` as JSON; a top-level list value longer than SMALL is encoded in slices."""
    big = [key for key, value in payload.items() if isinstance(value, list) and len(value) > SMALL]
    if not big:
        return dumps(payload).encode()
    parts: list[str] = []
    for key, value in payload.items():
        if key not in big:
            parts.append(f"{dumps(key)}:{dumps(value)}")
            continue
        items: list[str] = []
        for start in range(0, len(value), SLICE):
            items.append(",".join(dumps(item) for item in value[start:start + SLICE]))
            await asyncio.sleep(0)
        parts.append(f"{dumps(key)}:[{','.join(items)}]")
    return ("{" + ",".join(parts) + "}").encode()


async def json_response(payload: dict[str, Any], status: int = 200,
                        headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=await encode(payload), status=status, content_type="application/json",
                        headers=headers)
