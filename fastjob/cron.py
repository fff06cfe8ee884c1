"""Cron next-fire times: the compiled evaluator, or its twin with FASTJOB_PUREPYTHON=1.

Chosen like the timing wheel (fastjob/timewheel.py): the environment override is read
once at import; without it the compiled extension must import (a missing build is an
error, never a silent fallback).

API (both implementations)::

    parse(expr: str, timezone: str) -> Cron  # cached by (expr, timezone)
    Cron.next_after(after_ms: int) -> int    # first fire strictly after, epoch ms
    Cron.expr, Cron.timezone                 # as given to parse
    CronError(ValueError)                    # bad expression or zone; never fires

croniter is the reference model: tests/test_cron.py checks both implementations
against it.

Expressions
-----------
5 fields ``min hour dom month dow`` (minute precision: fires at second 0), or 6 with
seconds first ``sec min hour dom month dow``. Fields are split on ASCII whitespace;
case does not matter. Supported, with croniter's meaning (its parser is ported, quirks
included):

* ``*``; lists ``1,5,10``; ranges ``1-10``; steps ``*/5``, ``1-10/2``, ``5/15``
  (= ``5-59/15``; ``59/15`` is just 59); ranges that wrap (``fri-mon``, ``22-2``, with
  croniter's stepping across the wrap); month names ``jan``-``dec`` and weekday names
  ``sun``-``sat``; ``7`` is Sunday. An equal range (``5-5``, ``jan-jan``) means the
  whole field, as in croniter.
* ``?`` (alone) in day of month or day of week: the same as ``*``.
* Day of month: ``L`` (the last day, also as a range end: ``10-L``) and ``W``: ``15W``
  or ``W15``, the weekday nearest the 15th within the month (alone in its field; a day
  past the month's end means its last day).
* Day of week: ``mon#2`` / ``1#2`` (the second Monday; 1-5), ``mon-fri#1`` (names
  only), and ``L5`` (the last Friday: croniter's form, ``L`` before the weekday).
* Day of month and day of week: when either is ``*`` (or ``?``, or a list holding
  ``*``) both apply; when both are restricted, a day matching EITHER fires (OR, as in
  Vixie cron and croniter). croniter's special case is kept too: with both restricted
  and ``#``, ``L<d>`` or ``W`` in one of them, it fires on the days that field selects,
  and the other field only has to be able to coincide with them on some day, else the
  cron never fires (``0 0 1-7 * mon#1`` fires on every first Monday; ``0 0 8 * mon#1``
  never).

Refused (CronError, with the reason in the message): anything croniter refuses (values
out of range, steps of 0, unknown names, names in the wrong field, ``W`` in a list,
plain weekdays mixed with ``#``/``L`` ones, ...), and also, though croniter accepts
them: ``@hourly``-style aliases and 7-field (year) crons (FastJob crons have 5 or 6
fields), and hashed/random values ``H`` and ``R``. ``5L`` (Quartz's last Friday) and
``LW`` are refused, as croniter refuses them; the message for ``5L`` says to write
``L5``.

A cron that can never fire (``0 0 30 2 *``) parses, and ``next_after`` raises
CronError ("never fires"): no day ever matches its day and month fields (croniter
raises CroniterBadDateError after searching 50 years). Supported instants are
1900-01-01 to 2200-01-01 UTC: an ``after_ms`` outside, or a next fire past 2200,
raises CronError.

Time zones
----------
An IANA name as zoneinfo knows it (``""`` and None are UTC); an unknown one raises
CronError "unknown timezone '...'". Fields match local wall-clock time (the date and
weekday too). Daylight-saving changes:

* A wall time skipped by a spring-forward change: if the hour field is ``*`` (all 24
  hours) the cron just loses it (an hourly cron has no 02:00 that day); otherwise it
  fires once, when the clock reaches it, moved forward in whole minutes to the first
  wall time that exists: a 02:30 cron fires at 03:00 local on the spring-forward day
  (02:30:15 -> 03:00:15; on Lord Howe's 30-minute change, 02:15 -> 02:30). This is
  croniter's behaviour.
* A wall time repeated by a fall-back change: if the hour field is ``*``, it fires at
  both instants (every real instant whose wall time matches: ``*/15`` never skips a
  quarter hour), as croniter does when the clock goes back a whole hour; croniter
  misses the repeated instants of a shorter change (Lord Howe's 30 minutes), this
  evaluator does not. Otherwise (a fixed-hour job) it fires ONCE, at the
  first occurrence (the earlier instant, ``fold=0``): ``30 1 * * *`` in New York on
  2024-11-03 fires at 01:30 EDT only. **This is the one difference from croniter**,
  which fires such a cron at both 01:30 EDT and 01:30 EST. Precisely: wherever
  croniter's next fire is the second occurrence (``fold=1``) of a repeated wall time
  and the cron's hour field is not ``*``, ``next_after`` gives croniter's first later
  fire that is not such an instant.

Speed: the compiled ``next_after`` takes about 0.1 us (bench/bench_cron.py). No
datetime is made on its path; zoneinfo is called only the first time a UTC year of a
zone is needed (about 370 calls to find that year's offset changes, cached for the
process), never for UTC and the fixed ``Etc/*`` zones.
"""

from __future__ import annotations

import os

from ._cron_py import CronError, _load_zone

__all__ = ["Cron", "CronError", "USING_CYTHON", "check_timezone", "parse"]

if os.environ.get("FASTJOB_PUREPYTHON", "") not in ("", "0"):
    from ._cron_py import Cron, parse

    USING_CYTHON = False
else:
    # the compiled twin has the same interface (_cron.pyi); ImportError here means: build it
    from ._cron import Cron, parse  # type: ignore[assignment]  # noqa: F401

    USING_CYTHON = True


_GOOD_ZONES: set[str] = set()  # names check_timezone found good (a declaration checks 100,000 jobs)


def check_timezone(name: str) -> None:
    """Raise CronError unless ``name`` is a zone a schedule may use: the rule cron jobs follow,
    applied to every schedule kind (a fixed-rate job's zone is shown, and may become a cron)."""
    if isinstance(name, str) and name in _GOOD_ZONES:
        return
    _load_zone(name)
    if isinstance(name, str) and len(_GOOD_ZONES) < 1024:
        _GOOD_ZONES.add(name)
