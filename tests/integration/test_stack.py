"""The local stack against the real services: `up` is idempotent and leaves both answering.

When the default ports are free the tests bring up a throwaway stack in a temporary root and
purge it afterwards. When something already listens there (the CI session starts the stack before
the suites run), they use the default stack root instead, never stop it, and skip the outage
tests that would pull it from under the other suites. A foreign server on the default ports makes
`up` fail with a message naming it, which is the behaviour under test too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clickhouse_driver import Client
from kafka import KafkaAdminClient

from deploy.processes import port_is_free
from deploy.stack import (
    CLICKHOUSE_HTTP_PORT,
    CLICKHOUSE_PORT,
    KAFKA_CONTROLLER_PORT,
    KAFKA_PORT,
    LOOPBACK,
    Stack,
    StackError,
    default_stack_root,
)

pytestmark = pytest.mark.integration

DEFAULT_PORTS = (KAFKA_PORT, KAFKA_CONTROLLER_PORT, CLICKHOUSE_PORT, CLICKHOUSE_HTTP_PORT)
RELEASE = re.compile(r"\d+\.\d+\.\d+")


@dataclass(frozen=True)
class StackUnderTest:
    stack: Stack
    #: True when this module started the stack and may stop it.
    owned: bool


@pytest.fixture(scope="module")
def under_test(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackUnderTest]:
    if all(port_is_free(LOOPBACK, port) for port in DEFAULT_PORTS):
        stack = Stack(tmp_path_factory.mktemp("stack"))
        stack.up()
        yield StackUnderTest(stack, owned=True)
        stack.down(purge=True)
    else:
        stack = Stack(default_stack_root())
        stack.up()
        yield StackUnderTest(stack, owned=False)


@pytest.fixture
def stack(under_test: StackUnderTest) -> Stack:
    return under_test.stack


def test_up_again_keeps_the_same_processes(stack: Stack) -> None:
    before = stack.status()

    after = stack.up()

    assert before.kafka.pid is not None and before.clickhouse.pid is not None
    assert (after.kafka.pid, after.clickhouse.pid) == (before.kafka.pid, before.clickhouse.pid)


def test_status_shows_both_services_running_with_versions(stack: Stack) -> None:
    status = stack.status()

    assert status.running
    assert status.kafka.version is not None and RELEASE.match(status.kafka.version)
    assert status.clickhouse.version is not None and RELEASE.match(status.clickhouse.version)
    assert status.kafka.address == stack.kafka_bootstrap
    assert status.kafka.log_path.exists() and status.clickhouse.log_path.exists()
    assert status.render().count("running") == 2


def test_clickhouse_answers_select_1(stack: Stack) -> None:
    client = Client(LOOPBACK, port=stack.clickhouse.tcp_port, connect_timeout=5)
    try:
        assert client.execute("SELECT 1") == [(1,)]
    finally:
        client.disconnect()


def test_kafka_lists_topics(stack: Stack) -> None:
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap, request_timeout_ms=10_000)
    try:
        topics = admin.list_topics()
    finally:
        admin.close()

    assert isinstance(topics, list)


def test_the_broker_is_a_java_process_running_kafka_main(stack: Stack) -> None:
    broker_pid = stack.status().kafka.pid
    brokers = {pid: argv for pid, argv in _command_lines() if "kafka.Kafka" in argv}

    assert broker_pid is not None and broker_pid in brokers
    assert Path(brokers[broker_pid][0]).name == "java"


def test_up_secure_does_not_restart_a_broker_running_without_its_secured_listener(
    stack: Stack,
) -> None:
    if stack.kafka.secured:
        pytest.skip("this stack's broker was started secured")
    before = stack.status().kafka.pid

    with pytest.raises(StackError, match="stack down"):
        stack.up(secure=True)

    assert stack.status().kafka.pid == before
    assert stack.status().kafka.secure_address is None


def test_killed_broker_comes_back_with_start_kafka(under_test: StackUnderTest) -> None:
    if not under_test.owned:
        pytest.skip("the shared stack serves other suites; outages only on a stack of our own")
    stack = under_test.stack

    killed = stack.kill_kafka()
    assert killed is not None and not stack.status().kafka.running

    stack.start_kafka()
    assert stack.status().kafka.pid not in (None, killed)


def test_stopped_clickhouse_comes_back_with_start_clickhouse(under_test: StackUnderTest) -> None:
    if not under_test.owned:
        pytest.skip("the shared stack serves other suites; outages only on a stack of our own")
    stack = under_test.stack

    stack.stop_clickhouse()
    assert not stack.status().clickhouse.running

    stack.start_clickhouse()
    assert stack.status().clickhouse.version is not None


def _command_lines() -> Iterator[tuple[int, list[str]]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            yield int(entry.name), [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]
