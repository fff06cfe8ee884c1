"""What the container runs, run here directly (no Docker daemon on these machines): the image's
health check against a real server, and the servers' command lines of docker-compose.yml."""
from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from fastjob.server.cli import parse_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _json_array(instruction: str) -> list[str]:
    match = re.search(rf"^{instruction}[^\[]*(\[.*?\])\s*$", DOCKERFILE, re.M | re.S)
    assert match, instruction
    return list(json.loads(match.group(1).replace("\\\n", " ")))


async def _health_check(http_address: str) -> int:
    argv = _json_array("    CMD")  # the HEALTHCHECK's command
    assert argv[:2] == ["python", "-c"]
    code = argv[2].replace("127.0.0.1:7701", http_address)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stderr=asyncio.subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 20)


@pytest.mark.slow
async def test_the_health_check_passes_on_a_ready_server_and_fails_without_one(servers, sqlite_url):
    server = await servers.start(sqlite_url)
    assert await _health_check(server.http_address) == 0
    await server.terminate()
    assert await _health_check(server.http_address) != 0


def test_the_image_and_compose_command_lines_are_valid(monkeypatch):
    entrypoint, cmd = _json_array("ENTRYPOINT"), _json_array("CMD")
    assert entrypoint == ["fastjob-server"]
    assert parse_config(cmd).insecure  # workers in the image's network connect without a token
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    servers = [name for name in compose["services"] if name.startswith("fastjob-")]
    assert len(servers) == 3
    for name in servers:
        service = {**compose["x-server"], **compose["services"][name]}
        for key, value in service["environment"].items():
            monkeypatch.setenv(key, value)
        config = parse_config(service["command"])
        assert config.db.startswith("mysql://") and config.host == "0.0.0.0" and config.insecure
        assert config.advertise == f"{name}:7700" and config.http_advertise == f"{name}:7701"
    worker = compose["services"]["worker"]
    assert worker["entrypoint"][-1] == "examples/seed_jobs.py" and (ROOT / "examples/seed_jobs.py").exists()
