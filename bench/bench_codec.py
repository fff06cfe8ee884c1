"""One frame's codec cost: today's msgpack + schema check against msgspec's typed decode.

    python bench/bench_codec.py           # needs msgspec installed (pip install msgspec); not a dependency

Measures, per DISPATCH frame (the server's most frequent outgoing message) and per RESULT (its
most frequent incoming one): decoding a whole frame as the server does today (header, msgpack,
envelope, schema validation), msgpack.unpackb alone (no validation), msgspec decoding into typed
Structs built from the same SCHEMAS table (validation included), and encoding both ways. Both
codecs read the same bytes: the check at the start fails otherwise. Figures are the best of
several rounds, in microseconds; ratios are against today's decode in the same run.
"""
from __future__ import annotations

import os
import sys
import timeit
from typing import Any

import msgpack

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from fastjob.protocol import SCHEMAS, Decoder, encode  # noqa: E402

DISPATCH = {"instance_id": 123456789, "job_id": 42, "job": "send-report", "handler": "reports.send_daily",
            "params": {"region": "eu", "limit": 100}, "attempt": 1, "scheduled_at": 1700000000.0, "timeout": 30.0}
RESULT = {"instance_id": 123456789, "status": "succeeded", "result": {"rows": 10}, "started_at": 1700000000.5,
          "finished_at": 1700000001.25}
_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool, "any": Any, "map": dict,
                          "float|nil": float | None, "str|nil": str | None}


def struct_for(kind: str) -> Any:
    """A msgspec Struct (array-like envelope aside) derived from protocol.SCHEMAS[kind]."""
    import msgspec

    fields = []
    for name, spec in SCHEMAS[kind].items():
        optional = spec.endswith("?")
        tp = _TYPES[spec.rstrip("?")]
        fields.append((name, tp, None) if optional else (name, tp))
    fields.sort(key=len)  # required fields first
    return msgspec.defstruct(kind.title(), fields, forbid_unknown_fields=False, omit_defaults=True)


def best(stmt: Any, number: int = 100_000, repeat: int = 7) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e6


def measure(kind: str, body: dict[str, Any]) -> dict[str, float]:
    import msgspec

    frame = encode(kind, body, 0)
    payload = frame[4:]
    body_type = struct_for(kind)
    envelope = tuple[str, int, body_type]
    decoder = msgspec.msgpack.Decoder(envelope)
    encoder = msgspec.msgpack.Encoder()
    typed = decoder.decode(payload)
    assert typed[2].instance_id == body["instance_id"], "msgspec reads today's bytes"
    assert msgpack.unpackb(encoder.encode(typed)) == msgpack.unpackb(payload), "and writes the same message"
    today = Decoder()
    return {
        "decode today": best(lambda: today.feed(frame)),
        "msgpack.unpackb": best(lambda: msgpack.unpackb(payload)),
        "msgspec typed": best(lambda: decoder.decode(payload)),
        "encode today": best(lambda: encode(kind, body, 0)),
        "msgspec encode": best(lambda: encoder.encode(typed)),
    }


def main() -> None:
    try:
        import msgspec
    except ImportError:
        sys.exit("bench_codec needs msgspec: pip install msgspec")
    print(f"msgspec {msgspec.__version__}, msgpack {msgpack.version}")
    for kind, body in (("DISPATCH", DISPATCH), ("RESULT", RESULT)):
        times = measure(kind, body)
        base = times["decode today"]
        print(f"{kind} ({len(encode(kind, body))} bytes)")
        for name, us in times.items():
            print(f"  {name:16s} {us:6.2f} us   {us / base:5.2f} x today's decode")


if __name__ == "__main__":
    main()
