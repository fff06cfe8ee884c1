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
])
def test_bad_settings_are_one_line_refusals(monkeypatch, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as refused:
        parse_config(argv)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
