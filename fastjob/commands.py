"""Built-in handlers that run a program (``fastjob:command``) or a container image (``fastjob:container``).

Running programs is a privilege, so both are off by default: a worker registers them only when it is
given an allow-list (``Worker(allow_commands=[...], allow_images=[...])``), and a job that names
anything else fails without running anything. The job's own params say what runs; what a trigger
passes reaches the program only as data (the ``FASTJOB_PARAMS`` variable and standard input), never
as its argv, image, cwd or environment names (the server sends the two apart: DISPATCH
``trigger_params``).

The program gets a small environment, not the worker's (which may hold the worker's token): the
variables in :data:`INHERITED_ENV`, the job's ``env``, and ``FASTJOB_*`` (:func:`fastjob_env`).

Each run owns a process group (a new session). A timeout, a kill or a stopping worker cancels the
run: the group gets SIGTERM, then SIGKILL once the main process is gone and its output closed, or
after :data:`KILL_GRACE` seconds, before the cancellation goes on. When the main process exits on its
own, what it left running in its group is ended the same way: no orphans. A process that starts a
session of its own leaves the group, and only a cgroup would hold it.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import fnmatch
import json
import os
import re
import shutil
import signal
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .context import Handler, JobContext

BUILTIN_PREFIX = "fastjob:"  # handler names reserved for the built-in handlers
COMMAND_HANDLER = "fastjob:command"
CONTAINER_HANDLER = "fastjob:container"

#: Variables a program inherits from the worker (the rest of the worker's environment stays out).
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")
#: What the container CLI itself also reads from the worker's environment (never passed into a container).
RUNTIME_ENV_PREFIXES = ("DOCKER_", "CONTAINER_", "CONTAINERS_", "PODMAN_", "REGISTRY_", "XDG_")
#: Names a container job's env may not set: the CLI would read them as its own settings.
RUNTIME_ENV_NAMES = ("PATH", "HOME", "TMPDIR")

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL of a run's process group
REAP_WAIT = 2.0  # seconds to wait for the main process to be reaped (and the output closed) after SIGKILL
CLEANUP_TIMEOUT = 10.0  # seconds for ``<runtime> rm -f`` of a cancelled container
MAX_ARGS = 1024  # items of argv
MAX_ARGV_BYTES = 64 * 1024  # argv, in UTF-8
MAX_ENV = 256  # entries of env
MAX_ENV_BYTES = 64 * 1024  # env names and values, in UTF-8
MAX_STDIN = 1024 * 1024  # the job's "stdin", in UTF-8
MAX_PARAMS_JSON = 64 * 1024  # trigger params as JSON (one environment string may be 128 KiB at most)
MAX_IMAGE = 255  # characters of an image reference
LINE_BYTES = 4000  # bytes kept of one output line (with the cut mark, within the worker's 4096-character log line)
TAIL_CHARS = 4096  # characters of the last output lines kept for the result or the error
MAX_LOGGED_LINES = 10_000  # output lines of one run sent to its log (the worker keeps no more)
READ_CHUNK = 64 * 1024

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_COMMAND_KEYS = ("argv", "env", "cwd", "stdin")
_CONTAINER_KEYS = ("image", "argv", "env")


class CommandError(Exception):
    """A command or container job that cannot run: bad params, not allowed, or not startable."""


class CommandFailed(Exception):
    """The program ran and exited with a status other than 0."""


# ---- params ------------------------------------------------------------------------------------
def _params(value: Any, known: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CommandError(f"{what} params must be a map with {', '.join(known)}, got {type(value).__name__}")
    unknown = sorted(str(key) for key in value if key not in known)
    if unknown:
        raise CommandError(f"unknown {what} param {unknown[0]!r}; known: {', '.join(known)}")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise CommandError(f"{name} must be a string, got {type(value).__name__}")
    if "\0" in value:
        raise CommandError(f"{name} must not contain a NUL character")
    return value


def parse_argv(value: Any, required: bool = True) -> list[str]:
    """A list of strings, bounded in count and size; non-empty when ``required``."""
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise CommandError("argv must be a non-empty list of strings" if required else "argv must be a list of strings")
    if len(value) > MAX_ARGS:
        raise CommandError(f"argv has {len(value)} items; at most {MAX_ARGS}")
    argv = [_text(item, f"argv[{index}]") for index, item in enumerate(value)]
    size = sum(len(item.encode()) for item in argv)
    if size > MAX_ARGV_BYTES:
        raise CommandError(f"argv is {size} bytes; at most {MAX_ARGV_BYTES}")
    return argv


def parse_env(value: Any, reserved: Callable[[str], bool] = lambda name: False) -> dict[str, str]:
    """A map of variable names to strings, bounded; FASTJOB_* and ``reserved`` names are refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CommandError(f"env must be a map of names to strings, got {type(value).__name__}")
    if len(value) > MAX_ENV:
        raise CommandError(f"env has {len(value)} entries; at most {MAX_ENV}")
    env: dict[str, str] = {}
    for name, text in value.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise CommandError(f"env name {str(name)[:60]!r} is not a variable name (letters, digits, _)")
        if name.startswith("FASTJOB_") or reserved(name):
            raise CommandError(f"env name {name!r} is reserved")
        env[name] = _text(text, f"env[{name!r}]")
    size = sum(len(name.encode()) + len(text.encode()) for name, text in env.items())
    if size > MAX_ENV_BYTES:
        raise CommandError(f"env is {size} bytes; at most {MAX_ENV_BYTES}")
    return env


def _runtime_reserved(name: str) -> bool:
    return name in RUNTIME_ENV_NAMES or name.startswith(RUNTIME_ENV_PREFIXES)


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """A command job's own params, checked."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    stdin: str | None


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """A container job's own params, checked (an empty argv runs the image's default command)."""

    image: str
    argv: list[str]
    env: dict[str, str]


def parse_command(params: Any) -> CommandSpec:
    """``{"argv": [...], "env": {...}, "cwd": "...", "stdin": "..."}``; one clear line if bad."""
    body = _params(params, _COMMAND_KEYS, "command")
    cwd = None if body.get("cwd") is None else _text(body["cwd"], "cwd")
    stdin = None if body.get("stdin") is None else _text(body["stdin"], "stdin")
    if stdin is not None and len(stdin.encode()) > MAX_STDIN:
        raise CommandError(f"stdin is more than {MAX_STDIN} bytes")
    return CommandSpec(parse_argv(body.get("argv")), parse_env(body.get("env")), cwd or None, stdin)


def parse_container(params: Any) -> ContainerSpec:
    """``{"image": "...", "argv": [...], "env": {...}}``; one clear line if bad."""
    body = _params(params, _CONTAINER_KEYS, "container")
    image = _text(body.get("image"), "image")
    if not image or len(image) > MAX_IMAGE or image.startswith("-") or any(ch.isspace() for ch in image):
        raise CommandError(f"image must be an image reference (1 to {MAX_IMAGE} characters, no spaces, not"
                           f" starting with '-'), got {image[:60]!r}")
    return ContainerSpec(image, parse_argv(body.get("argv"), required=False),
                         parse_env(body.get("env"), _runtime_reserved))


# ---- allow-lists ---------------------------------------------------------------------------------
def _entries(value: Iterable[str], what: str) -> list[str]:
    if isinstance(value, str):
        raise ValueError(f"{what} must be a list, not a string")
    entries = list(value)
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"{what}: each entry must be a non-empty string, got {entry!r}")
    return entries


def resolve_program(program: str) -> str | None:
    """The absolute path a program name (looked up on the worker's PATH) or an absolute path runs;
    None if there is no such executable. A relative path is never resolved (it would depend on cwd)."""
    if "/" in program and not program.startswith("/"):
        return None
    found = shutil.which(program)
    return None if found is None else os.path.normpath(os.path.abspath(found))


class CommandAllowList:
    """The programs a worker runs: names found on its PATH, or absolute paths, compared by resolved path
    (not by following symlinks: one multi-call binary may stand behind many names)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.paths: frozenset[str] = frozenset(self._resolve(entry) for entry in _entries(entries, "allow_commands"))

    @staticmethod
    def _resolve(entry: str) -> str:
        if "/" in entry and not entry.startswith("/"):
            raise ValueError(f"allow_commands: {entry!r} must be a program name or an absolute path")
        path = resolve_program(entry)
        if path is None:
            raise ValueError(f"allow_commands: {entry!r} is not an executable program on this worker's PATH")
        return path

    def check(self, program: str) -> str:
        """The path to run for argv[0]; CommandError, running nothing, if it is not allowed."""
        if "/" in program and not program.startswith("/"):
            raise CommandError(f"argv[0] {program!r} must be a program name or an absolute path")
        path = resolve_program(program)
        if path is None:
            raise CommandError(f"program {program!r} not found on this worker")
        if path not in self.paths:
            raise CommandError(f"program {program!r} ({path}) is not in this worker's allow_commands")
        return path


class ImageAllowList:
    """The images a worker runs: fnmatch patterns (``alpine:*``; ``*`` also matches ``/``)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(_entries(patterns, "allow_images"))

    def check(self, image: str) -> None:
        if not any(fnmatch.fnmatchcase(image, pattern) for pattern in self.patterns):
            raise CommandError(f"image {image!r} is not in this worker's allow_images")


def find_runtime(setting: str | None) -> str:
    """The container CLI: ``setting`` (a name on PATH or an absolute path), else podman, else docker."""
    names = [setting] if setting else ["podman", "docker"]
    for name in names:
        path = resolve_program(name)
        if path is not None:
            return path
    raise ValueError(f"container runtime {setting!r} not found" if setting else
                     "allow_images needs a container runtime: neither podman nor docker is on PATH"
                     " (or give container_runtime=)")


def container_argv(runtime: str, spec: ContainerSpec, name: str, env_names: Iterable[str]) -> list[str]:
    """``<runtime> run --rm -i --name NAME [--env K ...] IMAGE ARGV...``: each variable is passed by
    name, so its value comes from the CLI's environment and never shows in a process listing; the
    name lets a cancelled run's container be removed (``rm -f``) if the CLI was killed first."""
    argv = [runtime, "run", "--rm", "-i", "--name", name]
    for env_name in sorted(env_names):
        argv += ["--env", env_name]
    return [*argv, spec.image, *spec.argv]


# ---- environment and input -----------------------------------------------------------------------
def base_env(prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """The worker's variables a program inherits: INHERITED_ENV, and those starting with ``prefixes``."""
    env = {name: value for name, value in os.environ.items()
           if name in INHERITED_ENV or (prefixes and name.startswith(prefixes))}
    env.setdefault("PATH", os.defpath)
    return env


def params_json(ctx: JobContext) -> str:
    """The trigger's params as JSON (``null`` for a scheduled fire), bounded."""
    try:
        text = json.dumps(ctx.trigger_params, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise CommandError(f"trigger params cannot be passed as JSON: {exc}") from None
    if len(text.encode()) > MAX_PARAMS_JSON:
        raise CommandError(f"trigger params are more than {MAX_PARAMS_JSON} bytes as JSON")
    return text


def fastjob_env(ctx: JobContext, params: str) -> dict[str, str]:
    """What a program learns of its run: the trigger's params (JSON) and the run's identity."""
    return {
        "FASTJOB_PARAMS": params,
        "FASTJOB_INSTANCE_ID": str(ctx.instance_id),
        "FASTJOB_JOB": ctx.job,
        "FASTJOB_ATTEMPT": str(ctx.attempt),
        "FASTJOB_SCHEDULED_AT": f"{ctx.scheduled_at:.3f}",
    }


# ---- running -------------------------------------------------------------------------------------
@dataclass(slots=True)
class Launch:
    """One process to start: argv, the file to execute, its environment, cwd and standard input, and
    what to run after a cancellation (a container's ``rm -f``)."""

    argv: list[str]
    executable: str
    env: dict[str, str]
    stdin: bytes
    cwd: str | None = None
    after_cancel: list[str] = field(default_factory=list)


class _Stream:
    """One output stream cut into bounded lines; each goes to ``emit``, the last ones to a bounded tail."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._line = bytearray()
        self._cut = 0  # bytes of the current line beyond LINE_BYTES
        self._tail: collections.deque[str] = collections.deque()
        self._tail_chars = 0

    def feed(self, data: bytes) -> None:
        *complete, rest = data.split(b"\n")
        for piece in complete:
            self._add(piece)
            self._end_line()
        self._add(rest)

    def close(self) -> None:
        if self._line or self._cut:
            self._end_line()

    def tail(self) -> str:
        return "\n".join(self._tail)[-TAIL_CHARS:]

    def _add(self, piece: bytes) -> None:
        room = max(0, LINE_BYTES - len(self._line))
        self._line += piece[:room]
        self._cut += max(0, len(piece) - room)

    def _end_line(self) -> None:
        text = self._line.decode(errors="replace").rstrip("\r")
        if self._cut:
            text += f" [{self._cut} more bytes cut]"
        self._line.clear()
        self._cut = 0
        self._emit(text)
        self._tail.append(text)
        self._tail_chars += len(text) + 1
        while self._tail_chars > TAIL_CHARS and len(self._tail) > 1:
            self._tail_chars -= len(self._tail.popleft()) + 1


class _Output:
    """A run's stdout (to ``ctx.log.info``) and stderr (to ``ctx.log.warning``), at most MAX_LOGGED_LINES logged."""

    def __init__(self, ctx: JobContext) -> None:
        self._log = ctx.log
        self.unlogged = 0
        self._logged = 0
        self.stdout = _Stream(lambda text: self._send(self._log.info, text))
        self.stderr = _Stream(lambda text: self._send(self._log.warning, text))

    def _send(self, log: Callable[..., None], text: str) -> None:
        if self._logged >= MAX_LOGGED_LINES:
            self.unlogged += 1
            return
        self._logged += 1
        log("%s", text)

    def close(self) -> None:
        self.stdout.close()
        self.stderr.close()
        if self.unlogged:
            self._log.warning("%d more output lines were not logged (at most %d are)", self.unlogged, MAX_LOGGED_LINES)

    def failure_tail(self) -> str:
        return self.stderr.tail() or self.stdout.tail()


async def _pump(stream: asyncio.StreamReader, sink: _Stream) -> None:
    while chunk := await stream.read(READ_CHUNK):
        sink.feed(chunk)


async def _feed(stream: asyncio.StreamWriter, data: bytes) -> None:
    """Write the run's standard input and close it; a program that does not read it is no error."""
    with contextlib.suppress(OSError):  # BrokenPipeError, ConnectionResetError: it exited or closed stdin
        if data:
            stream.write(data)
            await stream.drain()
        stream.close()
        await stream.wait_closed()


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal every process of the group; False if none is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed its user: the rest got the signal
        return True
    return True


async def _main_exit(proc: asyncio.subprocess.Process) -> None:
    """Returns once the main process has exited. Process.wait() also waits for its output pipes to
    close, which what it left running may hold open; a pidfd (Linux) says when the process itself ends."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux, or already reaped
        while proc.returncode is None:  # pragma: no cover - other systems
            await asyncio.sleep(0.05)
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _end_group(pgid: int, watched: set[asyncio.Future[Any]], grace: float) -> None:
    """SIGTERM to the group; SIGKILL once ``watched`` (the main process's exit, the output) is done or
    after ``grace``. The SIGKILL goes out even if this is cancelled."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    try:
        await asyncio.wait(watched, timeout=grace)
    finally:
        _signal_group(pgid, signal.SIGKILL)


async def _stop(pgid: int, watched: set[asyncio.Future[Any]], launch: Launch) -> None:
    """End a cancelled run: its process group, then (for a container) the container itself."""
    await _end_group(pgid, watched, KILL_GRACE)
    await asyncio.wait(watched, timeout=REAP_WAIT)
    if launch.after_cancel:
        await _run_quietly(launch.after_cancel, launch.env)


async def _run_quietly(argv: list[str], env: dict[str, str]) -> None:
    """Run a cleanup command, bounded in time, its output discarded (it may find nothing to clean)."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, env=env,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return
    try:
        await asyncio.wait_for(proc.wait(), CLEANUP_TIMEOUT)
    except asyncio.TimeoutError:
        _signal_group(proc.pid, signal.SIGKILL)


async def _spawn(launch: Launch) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *launch.argv, executable=launch.executable, cwd=launch.cwd, env=launch.env, start_new_session=True,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        where = f" in {launch.cwd!r}" if launch.cwd else ""
        raise CommandError(f"cannot start {launch.argv[0]!r}{where}: {exc.strerror or exc}") from None


async def run_process(ctx: JobContext, launch: Launch) -> dict[str, Any]:
    """Run one process to its end, its output to the job's log; the result, or CommandFailed."""
    proc = await _spawn(launch)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    output = _Output(ctx)
    feeder = asyncio.ensure_future(_feed(proc.stdin, launch.stdin))
    watched: set[asyncio.Future[Any]] = {
        asyncio.ensure_future(proc.wait()),
        asyncio.ensure_future(_pump(proc.stdout, output.stdout)),
        asyncio.ensure_future(_pump(proc.stderr, output.stderr)),
    }
    try:
        await _main_exit(proc)
        await _end_group(proc.pid, watched, KILL_GRACE)  # what it left running in its group
        await asyncio.wait(watched, timeout=REAP_WAIT)  # bounded: a process of another session may hold the output
    except asyncio.CancelledError:  # a timeout, a kill, the worker stopping: end it all before going on
        stopping = asyncio.ensure_future(_stop(proc.pid, watched, launch))
        with contextlib.suppress(asyncio.CancelledError):  # cancelled again: the stop goes on by itself
            await asyncio.shield(stopping)
        raise
    finally:
        for task in (feeder, *watched):
            task.cancel()
    output.close()
    return _outcome(proc.returncode, output)


def _outcome(code: int | None, output: _Output) -> dict[str, Any]:
    if code == 0:
        return {"exit_code": 0, "output_tail": output.stdout.tail()}
    if code is None:
        raise CommandFailed(f"exit status unknown: {output.failure_tail()}")
    how = ""
    if code < 0:
        with contextlib.suppress(ValueError):
            how = f" (killed by {signal.Signals(-code).name})"
    tail = output.failure_tail()
    raise CommandFailed(f"exit code {code}{how}" + (f": {tail}" if tail else ""))


def _stdin(own: str | None, params: str) -> bytes:
    """The job's own ``stdin`` if it sets one, else the trigger's params as one line of JSON."""
    return own.encode() if own is not None else (params + "\n").encode()


# ---- the handlers --------------------------------------------------------------------------------
class BuiltinHandlers:
    """The ``fastjob:command`` and ``fastjob:container`` handlers of one worker, with its allow-lists."""

    def __init__(self, commands: CommandAllowList | None, images: ImageAllowList | None,
                 runtime: str | None) -> None:
        self.commands = commands
        self.images = images
        self.runtime = runtime  # the container CLI's path (needed with images)

    async def command(self, ctx: JobContext) -> dict[str, Any]:
        """Run the job's argv (never through a shell)."""
        assert self.commands is not None
        spec = parse_command(ctx.params)
        executable = self.commands.check(spec.argv[0])
        params = params_json(ctx)
        env = {**base_env(), **spec.env, **fastjob_env(ctx, params)}
        return await run_process(ctx, Launch(spec.argv, executable, env, _stdin(spec.stdin, params), spec.cwd))

    async def container(self, ctx: JobContext) -> dict[str, Any]:
        """Run the job's image through the container CLI; the trigger's params reach it as for a command."""
        assert self.images is not None and self.runtime is not None
        spec = parse_container(ctx.params)
        self.images.check(spec.image)
        params = params_json(ctx)
        inner = {**spec.env, **fastjob_env(ctx, params)}  # what the container sees
        name = f"fastjob-{ctx.instance_id}-{ctx.attempt}-{uuid.uuid4().hex[:8]}"
        argv = container_argv(self.runtime, spec, name, inner)
        env = {**base_env(RUNTIME_ENV_PREFIXES), **inner}
        return await run_process(ctx, Launch(argv, self.runtime, env, _stdin(None, params),
                                             after_cancel=[self.runtime, "rm", "-f", name]))


def builtin_handlers(allow_commands: Iterable[str] | None, allow_images: Iterable[str] | None,
                     container_runtime: str | None = None) -> dict[str, Handler]:
    """The built-in handlers a worker registers: none without an allow-list (running programs is a
    privilege). Raises ValueError for an allow-list entry that cannot be resolved, or images without a
    container runtime."""
    commands = CommandAllowList(allow_commands) if allow_commands is not None else None
    images = ImageAllowList(allow_images) if allow_images is not None else None
    if commands is not None and not commands.paths:
        commands = None
    if images is not None and not images.patterns:
        images = None
    runtime = find_runtime(container_runtime) if images is not None else None
    handlers = BuiltinHandlers(commands, images, runtime)
    found: dict[str, Handler] = {}
    if commands is not None:
        found[COMMAND_HANDLER] = handlers.command
    if images is not None:
        found[CONTAINER_HANDLER] = handlers.container
    return found
