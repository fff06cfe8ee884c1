"""The server's flags come from ServerConfig's fields: one default, one help, each flag and variable."""
from __future__ import annotations

import dataclasses

import pytest

from fastjob.server.cli import parse_config
from fastjob.server.config import ServerConfig


def test_no_flags_give_the_config_defaults(monkeypatch):
    for knob in dataclasses.fields(ServerConfig):
        monkeypatch.delenv(f"FASTJOB_{knob.name.upper()}", raising=False)
    assert parse_config([]) == ServerConfig()


def test_every_knob_has_a_flag_and_a_variable(monkeypatch):
    monkeypatch.setenv("FASTJOB_SCAN_HORIZON", "7.5")
    monkeypatch.setenv("FASTJOB_APP_TOKENS", "a=x,b=y")
    config = parse_config(["--port", "0", "--run-lease", "12", "--handshake-timeout", "3",
                           "--app-token", "c=z", "--scan-interval", "0.5"])
    assert (config.port, config.run_lease, config.handshake_timeout, config.scan_horizon, config.scan_interval) == (
        0, 12.0, 3.0, 7.5, 0.5)
    assert config.app_tokens == {"a": "x", "b": "y", "c": "z"}
    assert config.effective_run_lease == 12.0


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--heartbeat-timeout", "1", "--heartbeat-interval", "2"], {}, "--heartbeat-timeout must be longer"),
    (["--max-frame", "1000"], {}, "--max-frame must be at least 65536"),
    (["--app-token", "nope"], {}, "--app-token wants APP=TOKEN"),
    ([], {"FASTJOB_PORT": "abc"}, "FASTJOB_PORT='abc' is not a valid int"),
    (["--port", "99999"], {}, "--port must be in 0-65535, got 99999"),
    (["--port", "-5"], {}, "--port must be in 0-65535, got -5"),
    (["--log-level", "LOUD"], {}, "--log-level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"),
    (["--dispatch-wait", "-1"], {}, "--dispatch-wait must be a positive number of seconds, got -1"),
    (["--heartbeat-interval", "nan"], {}, "--heartbeat-interval must be a positive number of seconds, got nan"),
    (["--scan-interval", "0"], {}, "--scan-interval must be a positive number of seconds, got 0"),
    (["--misfire-threshold", "-3"], {}, "--misfire-threshold must be zero or more seconds, got -3"),
    (["--db", "foo://x"], {}, "--db: unsupported store URL 'foo://x'"),
    (["--tls-cert", "c.pem"], {}, "--tls-cert and --tls-key go together"),
])
def test_bad_settings_are_one_line_refusals(monkeypatch, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as refused:
        parse_config(argv)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_every_flag_says_its_default_and_its_variable():
    from fastjob.server.cli import build_parser

    for action in build_parser()._actions:
        if action.option_strings == ["-h", "--help"]:
            continue
        assert action.help and "default" in action.help and "FASTJOB_" in action.help, action.option_strings


def test_a_bad_flag_ends_the_server_with_one_line_and_no_traceback():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fastjob.server", "--port", "99999"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip() == "fastjob-server: --port must be in 0-65535, got 99999"


def test_a_database_that_cannot_be_reached_ends_the_server_with_one_line_and_no_traceback():
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port, closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "fastjob.server", "--port", "0", "--db",
                           f"mysql://root@127.0.0.1:{port}/test?retry_total=0.3"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("fastjob-server: --db: open: database unavailable")
