"""``fastjob``: the admin API from a shell, built on :class:`fastjob.Client` only.

Human output is aligned plain text (times in local ISO 8601, to the second); ``--json`` prints the
API's JSON answer as it is, for scripts. Exit codes: 0 done; 1 the API answered an error; 2 a
usage error; 3 the server could not be reached. An error is one line on stderr
(``fastjob: <code>: <message>``), never a traceback: it is the user's to fix, not ours to debug.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from .client import DEFAULT_URL, ApiError, Client

EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 1, 2, 3, 130

Json = dict[str, Any]
Command = Callable[[Client, argparse.Namespace], Awaitable[Json | None]]
Render = Callable[[Json], str]

#: The schedule options of a job; a file's schedule gives way to one given as an option.
SCHEDULE_OPTIONS = ("cron", "interval", "delay", "at")
#: Job options sent as they were parsed.
PLAIN_OPTIONS = ("handler", "cron", "interval", "delay", "retries", "timeout", "overlap", "misfire", "timezone",
                 "enabled", "mode", "min_success")


class UsageError(Exception):
    """A mistake in the command line that argparse cannot see (bad JSON, nothing to change): exit 2."""


# ---- formatting -----------------------------------------------------------------------------------
def when(ts: float | None) -> str:
    """Epoch seconds as local ISO 8601, to the second."""
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns aligned on the widest cell; ``(none)`` under the headers if there are no rows."""
    cells = [[cell(value) for value in row] for row in rows]
    widths = [max([len(header), *(len(row[i]) for row in cells)]) for i, header in enumerate(headers)]
    lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip()
             for row in [list(headers), *cells]]
    return "\n".join(lines if cells else [*lines, "(none)"])


def fields(pairs: Iterable[tuple[str, Any]]) -> str:
    """``key  value`` lines, values aligned."""
    pairs = [(key, cell(value)) for key, value in pairs]
    width = max((len(key) for key, _ in pairs), default=0)
    return "\n".join(f"{key.ljust(width)}  {value}".rstrip() for key, value in pairs)


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def schedule_of(job: Json) -> str:
    if job.get("cron") is not None:
        return f"cron {job['cron']} ({job.get('timezone', 'UTC')})"
    if job.get("interval") is not None:
        return f"every {job['interval']:g}s"
    if job.get("delay") is not None:
        return f"{job['delay']:g}s after each run"
    if job.get("at") is not None:
        return f"once at {when(job['at'])}"
    return "once" if job.get("run_once") else "on trigger"


def mode_of(job: Json) -> str:
    if job["mode"] == "single":
        return "single"
    return f"{job['mode']} (succeeds when at least {job['min_success']:.0%} of its runs do)"


def render_cluster(answer: Json) -> str:
    servers = table(("SERVER", "ADDRESS", "HTTP", "HEARTBEAT", "LOAD", "DRAIN", "APPS"),
                    [(s["id"], s["address"], s["http_address"], seconds(s["heartbeat_age"]) + " ago", s["load"],
                      s["drain"], s["apps"]) for s in answer["servers"]])
    apps = table(("APP", "OWNER", "EPOCH", "OWNER SINCE"),
                 [(a["name"], a["owner"], a["epoch"], when(a["since"])) for a in answer["apps"]])
    return f"{servers}\n\n{apps}"


def render_jobs(answer: Json) -> str:
    rows = [(j["name"], schedule_of(j), j["handler"], j["enabled"], when(j["next_fire_at"]), j["tags"])
            for j in answer["jobs"]]
    return _with_cursor(table(("NAME", "SCHEDULE", "HANDLER", "ENABLED", "NEXT FIRE", "TAGS"), rows), answer)


def render_job(answer: Json) -> str:
    job = answer["job"]
    enabled = "yes" if job["enabled"] else f"no (paused by {job['paused_by'] or 'its definition'})"
    text = fields([
        ("app", job["app"]), ("name", job["name"]), ("schedule", schedule_of(job)), ("handler", job["handler"]),
        ("enabled", enabled), ("next fire", when(job["next_fire_at"])),
        ("retries", f"{job['retries']} (backoff {job['retry_backoff']:g}s)"), ("timeout", job["timeout"]),
        ("overlap", job["overlap"]), ("misfire", job["misfire"]), ("mode", mode_of(job)), ("tags", job["tags"]),
        ("params", json.dumps(job["params"])), ("origin", job["origin"]), ("version", job["version"]),
        ("created", when(job["created_at"])), ("updated", when(job["updated_at"])),
        ("last finished", when(job["last_finished_at"])),
    ])
    if "next_fires" in answer:
        text += "\nnext fires:" + "".join(f"\n  {when(ts)}" for ts in answer["next_fires"])
    return text


def render_instances(answer: Json) -> str:
    return _with_cursor(_instance_table(answer["instances"]), answer)


def _instance_table(rows: list[Json]) -> str:
    return table(("ID", "JOB", "ATTEMPT", "STATUS", "TRIGGER", "PLANNED", "STARTED", "DURATION", "WORKER"),
                 [(r["id"], r.get("job"), r["attempt"], r["status"], r["trigger"], when(r["planned_at"]),
                   when(r["started_at"]), seconds(r["duration"]), r["worker"]) for r in rows])


def render_instance(answer: Json) -> str:
    row = answer["instance"]
    text = fields([
        ("id", row["id"]), ("app", row["app"]), ("job", row.get("job")), ("attempt", row["attempt"]),
        ("status", row["status"]), ("trigger", row["trigger"]), ("planned", when(row["planned_at"])),
        ("created", when(row["created_at"])), ("dispatched", when(row["dispatched_at"])),
        ("started", when(row["started_at"])), ("finished", when(row["finished_at"])),
        ("lateness", seconds(row["lateness"])), ("duration", seconds(row["duration"])), ("worker", row["worker"]),
        ("server", row["server"]), ("params", json.dumps(row["params"])), ("result", json.dumps(row["result"])),
        ("error", row["error"]),
    ])
    return f"{text}\n\nattempts of this fire:\n{_instance_table(answer['attempts'])}"


def log_line(line: Json) -> str:
    return f"{when(line['ts'])} {line['level']} {line['message']}"


def render_logs(answer: Json) -> str:
    return "\n".join(log_line(line) for line in answer["lines"])


def render_workers(answer: Json) -> str:
    return table(("WORKER", "ADDRESS", "CAPACITY", "RUNNING", "DRAINING", "CONNECTED", "HEARTBEAT", "HANDLERS",
                  "TAGS"),
                 [(w["id"], w["address"], w["capacity"], w["running"], w["draining"], when(w["connected_at"]),
                   seconds(w["heartbeat_age"]) + " ago", sorted(w["handlers"]), w["tags"]) for w in answer["workers"]])


def render_tokens(answer: Json) -> str:
    return table(("ID", "NAME", "ROLE", "APPS", "CREATED", "EXPIRES", "REVOKED"),
                 [(t["id"], t["name"], t["role"], t["apps"] or "all", when(t["created_at"]), when(t["expires_at"]),
                   when(t["revoked_at"])) for t in answer["tokens"]])


def render_new_token(answer: Json) -> str:
    """Its details, then the secret alone on the last line (shown this once: ``| tail -1`` keeps it)."""
    details = fields([("id", answer["id"]), ("name", answer["name"]), ("role", answer["role"]),
                      ("apps", answer["apps"] or "all"), ("expires", when(answer["expires_at"]))])
    return f"{details}\n{answer['token']}"


def _with_cursor(text: str, answer: Json) -> str:
    cursor = answer.get("next_cursor")
    return f"{text}\nmore: --cursor {cursor}" if cursor else text


# ---- reading options ----------------------------------------------------------------------------------
def json_option(flag: str, raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"{flag} is not JSON: {exc}") from None


def read_job_file(path: str) -> Json:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as exc:
        raise UsageError(f"--file: {exc.strerror or exc}: {path}") from None
    job = json_option("--file", text)
    if not isinstance(job, dict):
        raise UsageError("--file must hold a JSON object: a job's fields")
    return job


def job_options(args: argparse.Namespace) -> Json:
    """The job fields given on the command line (over those of --file)."""
    job = read_job_file(args.file) if args.file else {}
    given = {key: getattr(args, key) for key in PLAIN_OPTIONS if getattr(args, key) is not None}
    if args.at is not None:
        given["at"] = _number_or_text(args.at)
    if args.params is not None:
        given["params"] = json_option("--params", args.params)
    if args.tags is not None:
        given["tags"] = [tag.strip() for tag in args.tags.split(",") if tag.strip()]
    if any(key in given for key in SCHEDULE_OPTIONS):
        job = {key: value for key, value in job.items() if key not in SCHEDULE_OPTIONS}
    return {**job, **given}


def _number_or_text(raw: str) -> float | str:
    try:
        return float(raw)
    except ValueError:
        return raw


# ---- commands ---------------------------------------------------------------------------------------
async def cmd_cluster(client: Client, args: argparse.Namespace) -> Json:
    return await client.cluster()


async def cmd_jobs_list(client: Client, args: argparse.Namespace) -> Json:
    return await client.list_jobs(args.app, name=args.name, tag=args.tag, cursor=args.cursor, limit=args.limit)


async def cmd_jobs_show(client: Client, args: argparse.Namespace) -> Json:
    return await client.get_job(args.app, args.name, next=args.next)


async def cmd_jobs_create(client: Client, args: argparse.Namespace) -> Json:
    job = job_options(args)
    if args.name is not None:
        job["name"] = args.name
    if "name" not in job:
        raise UsageError("jobs create: give the job's NAME (or a \"name\" in --file)")
    return await client.create_job(args.app, job)


async def cmd_jobs_edit(client: Client, args: argparse.Namespace) -> Json:
    changes = job_options(args)
    if not changes:
        raise UsageError("jobs edit: nothing to change; give the options to change (fastjob jobs edit -h)")
    return await client.update_job(args.app, args.name, changes)


async def cmd_jobs_delete(client: Client, args: argparse.Namespace) -> Json:
    return await client.delete_job(args.app, args.name)


async def cmd_jobs_pause(client: Client, args: argparse.Namespace) -> Json:
    return await client.pause_job(args.app, args.name)


async def cmd_jobs_resume(client: Client, args: argparse.Namespace) -> Json:
    return await client.resume_job(args.app, args.name)


async def cmd_jobs_trigger(client: Client, args: argparse.Namespace) -> Json:
    params = None if args.params is None else json_option("--params", args.params)
    instance_id = await client.trigger(args.app, args.name, params=params, force=args.force,
                                       idempotency_key=args.idempotency_key)
    return {"instance_id": instance_id}


async def cmd_instances_list(client: Client, args: argparse.Namespace) -> Json:
    return await client.list_instances(args.app, job=args.job, status=args.status, since=args.since,
                                       until=args.until, cursor=args.cursor, limit=args.limit)


async def cmd_instances_show(client: Client, args: argparse.Namespace) -> Json:
    return await client.get_instance(args.id)


async def cmd_instances_kill(client: Client, args: argparse.Namespace) -> Json:
    return await client.kill(args.id)


async def cmd_instances_retry(client: Client, args: argparse.Namespace) -> Json:
    params = None if args.params is None else json_option("--params", args.params)
    return await client.retry(args.id, force=args.force, params=params)


async def cmd_logs(client: Client, args: argparse.Namespace) -> Json | None:
    if not args.follow:
        return await client.logs(args.id, limit=args.limit)
    stream = client.follow_logs(args.id)
    try:
        async for line in stream:
            print(json.dumps(line) if args.json else log_line(line), flush=True)
    finally:
        await stream.aclose()
    if not args.json:
        print(f"-- instance {args.id} ended: {stream.status}", file=sys.stderr)
    return None


async def cmd_workers(client: Client, args: argparse.Namespace) -> Json:
    return await client.workers(args.app)


async def cmd_token_list(client: Client, args: argparse.Namespace) -> Json:
    return await client.list_tokens()


async def cmd_token_create(client: Client, args: argparse.Namespace) -> Json:
    return await client.create_token(args.name, args.role, apps=args.apps, expires_in=args.expires_in)


async def cmd_token_revoke(client: Client, args: argparse.Namespace) -> Json:
    return await client.revoke_token(args.id)


def _one_line(template: str) -> Render:
    return lambda answer: template.format(**answer)


# ---- the parser -------------------------------------------------------------------------------------------
def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--url, --token, --json: on the top parser with their defaults, and on every command with
    none, so that they may come before or after it."""
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--url", default=default(None),
                        help=f"the server's admin API (default: $FASTJOB_URL, else {DEFAULT_URL})")
    parser.add_argument("--token", default=default(None), help="a bearer token (default: $FASTJOB_TOKEN)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the API's JSON answer, for scripts")


class _Commands:
    """Adds leaf commands, each with the global options, its coroutine and its renderer."""

    def __init__(self, subparsers: Any) -> None:
        self.subparsers = subparsers
        self.common = argparse.ArgumentParser(add_help=False)
        _global_options(self.common, defaults=False)

    def add(self, name: str, command: Command, render: Render, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self.subparsers.add_parser(name, parents=[self.common], help=help,
                                                                     description=help)
        parser.set_defaults(command=command, render=render)
        return parser


def _group(subparsers: Any, name: str, help: str) -> _Commands:
    parser = subparsers.add_parser(name, help=help, description=help)
    inner = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
    return _Commands(inner)


def _job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", metavar="JOB.JSON", help="the job's fields as JSON ('-': stdin); options win")
    parser.add_argument("--handler", metavar="H", help="the handler's name (default: the job's name)")
    when_ = parser.add_mutually_exclusive_group()
    when_.add_argument("--cron", metavar="C", help="a cron expression (5 fields, or 6 with seconds first)")
    when_.add_argument("--interval", metavar="S", type=float, help="fire every S seconds")
    when_.add_argument("--delay", metavar="S", type=float, help="fire S seconds after each run ends")
    when_.add_argument("--at", metavar="T", help="fire once at T (epoch seconds or ISO 8601)")
    parser.add_argument("--retries", metavar="N", type=int, help="retries after a failure")
    parser.add_argument("--timeout", metavar="S", type=float, help="a run's time limit in seconds")
    parser.add_argument("--params", metavar="JSON", help="the handler's params, as JSON")
    parser.add_argument("--tags", metavar="a,b", help="tags, comma-separated")
    parser.add_argument("--overlap", metavar="P", help="queue, buffer_one, skip or allow")
    parser.add_argument("--misfire", metavar="P", help="fire_once, fire_all or skip")
    parser.add_argument("--timezone", metavar="TZ", help="the cron expression's time zone")
    parser.add_argument("--mode", metavar="M", help="single (one worker) or broadcast (every connected worker)")
    parser.add_argument("--min-success", metavar="F", type=float,
                        help="broadcast: the fraction of its runs that must succeed (above 0, at most 1)")
    parser.add_argument("--disabled", dest="enabled", action="store_const", const=False, help="paused")


def _add_jobs(subparsers: Any) -> None:
    jobs = _group(subparsers, "jobs", "list, show, create, edit, delete, pause, resume and trigger jobs")
    listing = jobs.add("list", cmd_jobs_list, render_jobs, "an app's jobs, by name")
    listing.add_argument("app")
    listing.add_argument("--name", metavar="PART", help="names containing PART")
    listing.add_argument("--tag", metavar="T", help="jobs tagged T")
    listing.add_argument("--limit", metavar="N", type=int)
    listing.add_argument("--cursor", metavar="C", help="the next page (printed after a full page)")
    show = jobs.add("show", cmd_jobs_show, render_job, "a job")
    show.add_argument("app")
    show.add_argument("name")
    show.add_argument("--next", metavar="N", type=int, help="list its next N fire times")
    create = jobs.add("create", cmd_jobs_create, render_job, "create a job")
    create.add_argument("app")
    create.add_argument("name", nargs="?", help="the job's name (or a \"name\" in --file)")
    _job_options(create)
    edit = jobs.add("edit", cmd_jobs_edit, render_job, "change a job: only the options given change")
    edit.add_argument("app")
    edit.add_argument("name")
    _job_options(edit)
    for name, command, help in (("delete", cmd_jobs_delete, "delete a job"), ("pause", cmd_jobs_pause, "pause a job"),
                                ("resume", cmd_jobs_resume, "resume a paused job")):
        render = _one_line("deleted: {deleted}") if name == "delete" else render_job
        leaf = jobs.add(name, command, render, help)
        leaf.add_argument("app")
        leaf.add_argument("name")
    trigger = jobs.add("trigger", cmd_jobs_trigger, _one_line("{instance_id}"),
                       "fire a job now; prints the new instance's id")
    trigger.add_argument("app")
    trigger.add_argument("name")
    trigger.add_argument("--params", metavar="JSON", help="params for this fire, as JSON")
    trigger.add_argument("--force", action="store_true", help="fire even if its overlap policy refuses")
    trigger.add_argument("--idempotency-key", metavar="K", help="a repeated trigger with K fires once")


def _add_instances(subparsers: Any) -> None:
    instances = _group(subparsers, "instances", "list, show, kill and retry instances")
    listing = instances.add("list", cmd_instances_list, render_instances, "an app's instances, latest first")
    listing.add_argument("app")
    listing.add_argument("--job", metavar="J")
    listing.add_argument("--status", metavar="S", help="statuses, comma-separated")
    listing.add_argument("--since", metavar="T", help="planned at or after T (epoch seconds or ISO 8601)")
    listing.add_argument("--until", metavar="T", help="planned before T")
    listing.add_argument("--limit", metavar="N", type=int)
    listing.add_argument("--cursor", metavar="C", help="the next page (printed after a full page)")
    instances.add("show", cmd_instances_show, render_instance, "an instance and its fire's attempts").add_argument(
        "id", type=int)
    instances.add("kill", cmd_instances_kill, _one_line("{instance_id}: {status}"),
                  "stop a running instance (cancel one not started)").add_argument("id", type=int)
    retry = instances.add("retry", cmd_instances_retry, _one_line("{instance_id}"),
                          "run a finished instance's fire again; prints the new attempt's id")
    retry.add_argument("id", type=int)
    retry.add_argument("--force", action="store_true", help="even if it succeeded or its job runs")
    retry.add_argument("--params", metavar="JSON", help="params for the new attempt, as JSON")


def _add_tokens(subparsers: Any) -> None:
    tokens = _group(subparsers, "token", "list, create and revoke API tokens")
    tokens.add("list", cmd_token_list, render_tokens, "every token (no secrets)")
    create = tokens.add("create", cmd_token_create, render_new_token,
                        "create a token; its secret is printed alone on the last line, this once")
    create.add_argument("--name", required=True, metavar="N", help="who holds it")
    create.add_argument("--role", required=True, metavar="R", help="viewer, operator, admin or worker")
    create.add_argument("--app", dest="apps", action="append", metavar="A", help="scope it to app A (repeatable)")
    create.add_argument("--expires-in", metavar="S", type=float, help="it expires after S seconds")
    tokens.add("revoke", cmd_token_revoke, _one_line("revoked: {id}"), "revoke a token").add_argument("id")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastjob", description="FastJob's admin API from a shell.",
                                     epilog="exit codes: 0 ok, 1 the API answered an error, 2 usage, 3 unreachable")
    _global_options(parser, defaults=True)
    subparsers = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)
    top = _Commands(subparsers)
    top.add("cluster", cmd_cluster, render_cluster, "servers and the apps each owns")
    _add_jobs(subparsers)
    _add_instances(subparsers)
    logs = top.add("logs", cmd_logs, render_logs, "an instance's log lines")
    logs.add_argument("id", type=int)
    logs.add_argument("-f", "--follow", action="store_true", help="follow new lines until the instance ends")
    logs.add_argument("--limit", metavar="N", type=int)
    top.add("workers", cmd_workers, render_workers, "an app's connected workers").add_argument("app")
    _add_tokens(subparsers)
    return parser


# ---- running --------------------------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> None:
    async with Client(args.url, args.token) as client:
        answer = await args.command(client, args)
    if answer is not None:
        print(json.dumps(answer, indent=2) if args.json else args.render(answer))


def fail(message: str, code: int) -> int:
    print(f"fastjob: {' '.join(message.split())}", file=sys.stderr)
    return code


def execute(args: argparse.Namespace) -> int:
    """Run a parsed command; its exit code."""
    try:
        asyncio.run(run(args))
    except UsageError as exc:
        return fail(str(exc), EXIT_USAGE)
    except ApiError as exc:
        return fail(f"{exc.code}: {exc.message}", EXIT_UNREACHABLE if exc.status == 0 else EXIT_API)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `fastjob ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> None:
    """The ``fastjob`` console script (exits with the code the module docstring lists)."""
    code = execute(build_parser().parse_args(argv))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
