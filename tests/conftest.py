"""Fixtures shared by every test: real Tango databases and real device servers on free ports.

Everything a test starts is registered in a state dir; teardown runs `livehist down` on
each one, and a last sweep kills anything still recorded there, so no process survives a
failing test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from livehist.site import control
from livehist.site.broker import TansuBroker, create_topic
from livehist.site.process import free_port, managed_processes

KAFKA_ENV = "LIVEHIST_KAFKA_BROKER"  # HOST:PORT of a site's Kafka: the same tests run against it
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SANS2D = SHARED / "data" / "SANS2D_minimal.nxs"


def run_cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the installed `livehist` command as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "livehist.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or dict(os.environ),
    )


class Sites:
    """Creates state dirs with a database on a free port; downs them all at teardown."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp = tmp_path_factory
        self.dirs: list[Path] = []

    def new(self, config: dict | None = None) -> tuple[Path, str, Path | None]:
        state = self.tmp.mktemp("state")
        self.dirs.append(state)
        cfg = None
        if config is not None:
            cfg = state / "config.json"
            cfg.write_text(json.dumps(config))
        return state, f"127.0.0.1:{free_port()}", cfg

    def up(self, config: dict | None = None, timeout: float = 90) -> control.Site:
        state, host, cfg = self.new(config)
        return control.up(host, cfg, state, timeout=timeout, say=lambda s: None)

    def cleanup(self) -> None:
        for d in self.dirs:
            try:
                control.down(d, say=lambda s: None)
            finally:
                for proc in managed_processes(d):
                    proc.stop(timeout=2)


@pytest.fixture(scope="session")
def sites(tmp_path_factory):
    s = Sites(tmp_path_factory)
    yield s
    s.cleanup()


@pytest.fixture(scope="session")
def sardana_site(sites) -> control.Site:
    """The default configuration (Sardana Pool/MacroServer/Door, ...) up on an embedded DB."""
    return sites.up()


@pytest.fixture(scope="session")
def kafka_broker():
    """HOST:PORT of a Kafka-protocol broker: $LIVEHIST_KAFKA_BROKER if set, else a Tansu of our own."""
    if os.environ.get(KAFKA_ENV):
        yield os.environ[KAFKA_ENV]
        return
    broker = TansuBroker().start()
    try:
        yield broker.address
    finally:
        broker.kill()


@pytest.fixture
def own_kafka_broker():
    """A Tansu broker for this test alone (one it may kill and restart)."""
    broker = TansuBroker().start()
    try:
        yield broker
    finally:
        broker.kill()


def kafka_topic(broker: str, partitions: int = 1, prefix: str = "livehist-test") -> str:
    """A new topic with a unique name and `partitions` partitions."""
    import uuid

    return create_topic(broker, f"{prefix}-{uuid.uuid4().hex[:12]}", partitions)
