"""A ClickHouse server of a test module's own, from the same templates as the local stack's, on
free ports under a temporary root: for what the shared server must not be restarted for (its TLS
port, users it gained since it started). Never touches the shared stack."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deploy.clickhouse_server import ClickHouseServer
from deploy.processes import free_port

LOOPBACK = "127.0.0.1"
#: 18.16 answers within seconds on two busy cores; as long as the stack gives its own server.
READY_SECONDS = 30.0


@contextmanager
def private_clickhouse(root: Path, *, tls: bool = False) -> Iterator[ClickHouseServer]:
    """A started server (a TLS port too when `tls`); stopped, by its own pid, on leaving."""
    server = ClickHouseServer(root / "clickhouse", LOOPBACK, free_port(), free_port(),
                              tls_port=free_port() if tls else None)
    pid = server.start(server.prepare(progress=lambda line: None))
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            try:
                server.probe()
                break
            except Exception:
                if not server.process.is_alive(pid) or time.monotonic() > deadline:
                    raise RuntimeError(f"private ClickHouse did not start: {server.last_error()}")
                time.sleep(0.3)
        yield server
    finally:
        server.process.stop(20.0)
