"""What writing a job declaration does to its stored row, decided once for every store.

A declaration (a worker's JOB_DECLARE, an API JOB_UPSERT) is compared with the stored row and
becomes an insert, an update or nothing. The rules that are not plain "store what was declared":

* ``next_trigger_ms`` is replaced only when the job is new or revived, its schedule changed, or
  it goes from disabled to enabled; otherwise it keeps its place. Code re-enabling an unchanged
  one-shot or run-once job gives it no new fire (it fired, or its fire is still stored: a pause by
  code or reconciliation keeps it); an operator's resume through the API plans it anew.
* Code owns a code-declared job's definition, operators own its paused state (``PausedBy``):
  code declaring ``enabled=True`` resumes what code or reconciliation paused, never what an
  operator paused; code declaring ``enabled=False`` pauses it (an operator's pause stays one).
* A declaration from code makes the job code-owned (``Origin.CODE``); an API write keeps the
  origin of an existing job and creates API-owned ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..models import Origin, PausedBy, ScheduleType
from .codecs import ENABLED, SPEC_COLS, differs

#: schedule_type, schedule_expr, timezone: a change of any is a schedule change
SCHEDULE = slice(SPEC_COLS.index("schedule_type"), SPEC_COLS.index("timezone") + 1)


@dataclass(slots=True)
class StoredJob:
    """What a declaration compares of a stored job; ``values`` in SPEC_COLS order."""

    id: int
    version: int
    is_delete: bool
    origin: str
    paused_by: str | None
    values: tuple[Any, ...]


@dataclass(slots=True)
class JobWrite:
    """What to write: ``values`` in SPEC_COLS order (``enabled`` as decided), and whether the
    stored next fire is replaced by the declaration's first fire."""

    values: tuple[Any, ...]
    origin: str
    paused_by: str | None
    new_next: bool


def plan_write(old: StoredJob | None, declared: tuple[Any, ...], origin: Origin) -> JobWrite | None:
    """The write a declaration (``declared``: spec_values of the spec) makes; None when nothing changed."""
    wants_enabled = bool(declared[ENABLED])
    if old is None or old.is_delete:
        paused = None if wants_enabled else (PausedBy.CODE if origin is Origin.CODE else PausedBy.OPERATOR).value
        return JobWrite(declared, origin.value, paused, new_next=True)
    was_enabled = bool(old.values[ENABLED])
    enabled, paused = _paused_state(was_enabled, old.paused_by, wants_enabled, origin)
    values = declared[:ENABLED] + (int(enabled),) + declared[ENABLED + 1:]
    new_origin = Origin.CODE.value if origin is Origin.CODE else old.origin
    if ((old.values == values or not any(differs(a, b) for a, b in zip(old.values, values, strict=True)))
            and paused == old.paused_by and new_origin == old.origin):
        return None
    schedule_changed = old.values[SCHEDULE] != values[SCHEDULE]
    one_shot = values[SPEC_COLS.index("schedule_type")] == ScheduleType.ONCE.value or bool(
        values[SPEC_COLS.index("run_once")])
    # an operator's resume (an API write) plans anew, as JOB_ENABLE does; code re-declaring a
    # one-shot that fired must not fire it again
    resumed = enabled and not was_enabled and (origin is Origin.API or not one_shot)
    return JobWrite(values, new_origin, paused, new_next=schedule_changed or resumed)


def _paused_state(was_enabled: bool, paused_by: str | None, wants_enabled: bool,
                  origin: Origin) -> tuple[bool, str | None]:
    """(enabled, paused_by) after a declaration of a live job."""
    if origin is Origin.API:  # the operator's own write decides
        return wants_enabled, None if wants_enabled else PausedBy.OPERATOR.value
    if wants_enabled:
        operator_paused = not was_enabled and paused_by in (None, PausedBy.OPERATOR.value)
        return (False, paused_by) if operator_paused else (True, None)
    if was_enabled or paused_by == PausedBy.UNDECLARED.value:
        return False, PausedBy.CODE.value
    return False, paused_by  # already paused (by an operator, or by code)
