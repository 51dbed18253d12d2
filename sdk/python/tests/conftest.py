"""Real agentmesh processes for the tests: `agentmesh dev` (every service in one process,
in-memory state) on free loopback ports, from the workspace's build (`target/debug`, or
`AGENTMESH_BIN_DIR`)."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def binary(name: str) -> str:
    directory = Path(os.environ.get("AGENTMESH_BIN_DIR", REPO / "target" / "debug"))
    path = directory / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `cargo build --bins` first")
    return str(path)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class Cluster:
    """Addresses (`http://127.0.0.1:port`) of each service of one `agentmesh dev`."""

    grpc: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path
    ports: list[int]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.unlink(missing_ok=True)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def start_dev(ports: list[int] | None = None, env: dict[str, str] | None = None) -> Cluster:
    """`agentmesh dev` on free ports (or on `ports`, two per service, to restart one), with
    `env` added to its environment."""
    listing = subprocess.run(
        [binary("agentmesh"), "services"], check=True, capture_output=True, text=True
    ).stdout
    services = [line.split() for line in listing.splitlines() if line.strip()]
    ports = ports or free_ports(2 * len(services))
    args, grpc = [binary("agentmesh"), "dev"], {}
    for i, (name, _, _, listen, admin_listen) in enumerate(services):
        grpc_port, admin_port = ports[2 * i], ports[2 * i + 1]
        args += [listen, f"127.0.0.1:{grpc_port}", admin_listen, f"127.0.0.1:{admin_port}"]
        grpc[name] = f"http://127.0.0.1:{grpc_port}"
    log = Path(tempfile.mkstemp(prefix="agentmesh-dev-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    cluster = Cluster(grpc, process, log, ports)
    deadline = time.monotonic() + 20
    for address in grpc.values():
        port = int(address.rsplit(":", 1)[1])
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"agentmesh dev exited: {cluster.logs()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agentmesh dev did not listen: {cluster.logs()}") from None
                time.sleep(0.05)
    return cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_dev()
    try:
        yield c
    finally:
        c.stop()
