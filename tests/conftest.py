"""Shared fixtures: the real local stack, and an isolated prefix + database per test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def stack() -> Iterator[Any]:
    """The local Kafka + ClickHouse. Started if needed; left running if it was already up."""
    from deploy.stack import Stack

    local = Stack()
    was_running = local.status().running
    local.up(progress=lambda line: None)
    yield local
    if not was_running and not os.environ.get("ATTRIBUTION_KEEP_STACK"):
        local.down(progress=lambda line: None)


@dataclass
class Isolated:
    """A topic prefix, database and state directory of one test's own."""

    env: dict[str, str]
    config: Any
    workers: list["WorkerProcess"] = field(default_factory=list)

    def worker(self, name: str = "w1", **extra_env: str) -> "WorkerProcess":
        env = dict(self.env, **extra_env)
        # Each worker its own RocksDB directory (two workers cannot open one), unless given.
        if "ATTRIBUTION_STATE_DIR" not in extra_env:
            env["ATTRIBUTION_STATE_DIR"] = str(Path(self.env["ATTRIBUTION_STATE_DIR"]) / name)
        process = WorkerProcess(env, Path(self.env["ATTRIBUTION_STATE_DIR"]) / f"{name}.log")
        self.workers.append(process)
        return process

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        from sinks.clickhouse import connect

        client = connect(self.config.clickhouse)
        try:
            return client.execute(sql.replace("{db}", self.config.clickhouse.database))  # type: ignore[no-any-return]
        finally:
            client.disconnect()

    def wait_for(self, sql: str, expected: Callable[[Any], bool], timeout: float = 120.0) -> Any:
        """Poll `sql` (first cell) until `expected(value)`; fail with the last value after timeout."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.query(sql)[0][0]
            except Exception as exc:  # ClickHouse may be down on purpose in outage tests
                value = exc
            if not isinstance(value, Exception) and expected(value):
                return value
            for worker in self.workers:
                worker.assert_alive_or_expected()
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting on {sql!r}; last value {value!r}")


class WorkerProcess:
    """`attribution worker` as a real subprocess, so tests can kill -9 it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.expect_exit = False

    def start(self) -> "WorkerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.expect_exit = False
        self.process = subprocess.Popen(
            [sys.executable, "-m", "attribution", "worker", "--loglevel", "info"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        return self

    def kill9(self) -> None:
        assert self.process is not None
        self.expect_exit = True
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.expect_exit = True
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def dump_stacks(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGUSR1)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def assert_alive_or_expected(self) -> None:
        if self.process is not None and not self.expect_exit and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"worker exited with {self.process.returncode}:\n{tail}")


ENV_KEYS = ("KAFKA_BOOTSTRAP", "TOPIC_PREFIX", "CLICKHOUSE_URL", "METRICS_PORT",
            "ATTRIBUTION_PARTITIONS", "ATTRIBUTION_STATE_DIR", "ATTRIBUTION_BATCH_SECONDS")


def make_isolated(stack: Any, state_dir: Path, partitions: int = 4) -> Isolated:
    from schemas.config import Config
    from sinks.migrate import migrate_server
    from streams.topics import ensure_topics

    tag = uuid.uuid4().hex[:10]
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP=stack.kafka_bootstrap,
        TOPIC_PREFIX=f"t{tag}.",
        CLICKHOUSE_URL=f"clickhouse://default@{stack.clickhouse_address}/t_{tag}",
        METRICS_PORT="0",
        ATTRIBUTION_PARTITIONS=str(partitions),
        ATTRIBUTION_STATE_DIR=str(state_dir / tag),
        ATTRIBUTION_BATCH_SECONDS="0.2",
        PYTHONPATH=str(REPO),
    )
    saved = {key: os.environ.get(key) for key in ENV_KEYS}
    os.environ.update({key: env[key] for key in ENV_KEYS})
    try:
        config = Config.from_env()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    migrate_server(config.clickhouse)
    ensure_topics(config)
    return Isolated(env, config)


@pytest.fixture
def isolated_factory(stack: Any, tmp_path: Path) -> Iterator[Callable[[], Isolated]]:
    """Make as many isolated environments as a test needs; all are cleaned up after it."""
    made: list[Isolated] = []

    def make() -> Isolated:
        made.append(make_isolated(stack, tmp_path))
        return made[-1]

    yield make
    for isolated in made:
        for worker in isolated.workers:
            worker.stop()
        try:
            isolated.query("DROP DATABASE IF EXISTS {db}")
        except Exception:  # the server may be the thing a test broke; the data is throwaway
            pass
        delete_topics(isolated.config)


def delete_topics(config: Any) -> None:
    """Delete the topics of a test's prefix (its inputs, internal topics and state changelogs).

    A broker keeps a few open files per partition: a suite that left every test's topics behind
    would run the shared broker out of file descriptors after a few runs (it did: ~20,000
    partitions, "Too many open files", the broker shut down)."""
    from schemas.config import app_id_for
    from streams.kafka_clients import admin

    if not config.topic_prefix:  # only a test's own prefix: never the shared topics
        return
    owned = (config.topic_prefix, app_id_for(config.topic_prefix) + "-")
    try:
        client = admin(config, request_timeout_ms=10_000)
    except Exception:  # the broker may be the thing a test broke; the topics are throwaway
        return
    try:
        doomed = [t for t in client.list_topics() if t.startswith(owned)]
        if doomed:
            client.delete_topics(doomed, timeout_ms=10_000)
    except Exception:
        pass
    finally:
        client.close()


@pytest.fixture
def isolated(isolated_factory: Callable[[], Isolated]) -> Isolated:
    return isolated_factory()
