"""The pipeline over SASL_SSL (contract §1, `stack up --secure`): each principal does its part and
nothing more.

The module starts a broker of its own, secured, under a temporary stack root on free ports (the
shared broker serves the other suites and is never reconfigured); ClickHouse is the shared one.
The ACLs are granted for this module's TOPIC_PREFIX, as `stack up --secure --topic-prefix` does.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka.errors import TopicAuthorizationFailedError

from conftest import REPO, Isolated
from deploy.kafka_security import PRINCIPALS
from deploy.stack import Stack, link_kafka_jars
from deploy.processes import free_port
from schemas.config import STATE_TABLES, Config

pytestmark = pytest.mark.integration

T = datetime(2026, 6, 1, 10, 0, tzinfo=timezone.utc)
H, D = timedelta(hours=1), timedelta(days=1)

REFERENCE = {
    "programs": [{"program_id": "aff", "kind": "affiliate", "lock_days": 30,
                  "commission": {"type": "percent", "rate": "0.10"}}],
    "affiliates": [{"affiliate_id": "sally", "program_id": "aff", "status": "active"},
                   {"affiliate_id": "fred", "program_id": "aff", "status": "active"}],
    "settings": {"fast_conversion_seconds": 5, "reviewers": ["ann"]},
}


def ts(delta: timedelta) -> str:
    return (T + delta).isoformat().replace("+00:00", "Z")


def click(event_id: str, visitor: str, affiliate: str) -> dict[str, Any]:
    return {"event_id": event_id, "type": "click", "ts": ts(timedelta()), "visitor_id": visitor,
            "session_id": f"s-{visitor}", "affiliate_id": affiliate, "channel": "email"}


def order(order_id: str, visitor: str, at: timedelta) -> dict[str, Any]:
    return {"event_id": f"e-{order_id}", "type": "order", "ts": ts(at), "order_id": order_id,
            "visitor_id": visitor, "customer_id": f"cust-{visitor}", "currency": "EUR",
            "total": "100.00"}


EVENTS = [
    click("c-paid", "v-paid", "sally"),
    click("c-fast", "v-fast", "fred"),
    order("o-paid", "v-paid", 1 * H),
    order("o-fast", "v-fast", timedelta(seconds=2)),  # 2 s after its click: held
]
TIME_MOVER = order("o-tick", "v-tick", 40 * D)  # passes both lock ends

# fact_id: (kind, amount, status) once the reviewer released o-fast and time moved on.
EXPECTED_FACTS = {
    "o-paid:accrual": ("accrual", "10.00", "pending"),
    "o-paid:approval": ("approval", "0.00", "approved"),
    "o-fast:accrual": ("accrual", "10.00", "held"),
    "o-fast:approval": ("approval", "0.00", "approved"),
}  # o-tick is unattributed: a row in attributed_orders, no fact


@dataclass
class SecuredPipeline:
    stack: Stack
    prefix: str
    database: str
    #: The environment of a command run as each principal.
    env: dict[str, dict[str, str]]
    worker: Isolated
    work_dir: Path

    def config(self, principal: str) -> Config:
        return config_of(self.env[principal])

    def attribution(self, principal: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "attribution", *args],
                              env=self.env[principal], capture_output=True, text=True,
                              timeout=120, cwd=REPO)

    def jsonl(self, name: str, events: list[dict[str, Any]]) -> Path:
        path = self.work_dir / name
        path.write_bytes(b"".join(orjson.dumps(event) + b"\n" for event in events))
        return path

    def facts(self) -> dict[str, tuple[str, str, str]]:
        rows = self.worker.query(
            "SELECT fact_id, kind, toString(amount), status FROM {db}.commission_facts FINAL")
        return {row[0]: (row[1], row[2], row[3]) for row in rows}


def config_of(env: dict[str, str]) -> Config:
    keys = ("KAFKA_BOOTSTRAP", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM",
            "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD_FILE", "KAFKA_SSL_CAFILE",
            "TOPIC_PREFIX", "CLICKHOUSE_URL", "ATTRIBUTION_PARTITIONS")
    return Config(**{key: env[key] for key in keys})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def secured(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredPipeline]:
    from sinks.migrate import migrate_server

    root = tmp_path_factory.mktemp("secured-stack")
    link_kafka_jars(stack, root)
    broker = Stack(root, kafka_port=free_port(), kafka_controller_port=free_port(),
                   kafka_secure_port=free_port(), clickhouse_port=stack.clickhouse.tcp_port,
                   clickhouse_http_port=stack.clickhouse.http_port)
    tag = uuid.uuid4().hex[:10]
    prefix, database = f"s{tag}.", f"sec_{tag}"
    work_dir = tmp_path_factory.mktemp("secured-pipeline")
    common = {key: value for key, value in os.environ.items()
              if not key.startswith(("KAFKA_", "TOPIC_PREFIX", "CLICKHOUSE_URL"))}
    common.update(
        TOPIC_PREFIX=prefix,
        CLICKHOUSE_URL=f"clickhouse://default@{stack.clickhouse_address}/{database}",
        ATTRIBUTION_PARTITIONS="2",
        ATTRIBUTION_STATE_DIR=str(work_dir / "state"),
        ATTRIBUTION_BATCH_SECONDS="0.2",
        METRICS_PORT="0",
        PYTHONPATH=str(REPO),
    )
    pipeline: SecuredPipeline | None = None
    try:
        broker.start_kafka(progress=lambda line: None, secure=True, topic_prefix=prefix)
        env = {}
        for principal in PRINCIPALS:
            settings = broker.client_env(principal)
            settings.pop("CLICKHOUSE_URL")  # the shared server's, with this module's database
            env[principal] = {**common, **settings}
        worker = Isolated(env["worker"], config_of(env["worker"]))
        pipeline = SecuredPipeline(broker, prefix, database, env, worker, work_dir)
        migrate_server(worker.config.clickhouse)
        yield pipeline
    finally:
        if pipeline is not None:
            for process in pipeline.worker.workers:
                process.stop()
            pipeline.worker.query("DROP DATABASE IF EXISTS {db}")
        broker.down(progress=lambda line: None, purge=True)


@pytest.fixture(scope="module")
def running(secured: SecuredPipeline) -> SecuredPipeline:
    """Reference data loaded as admin, events produced as producer, the worker running as worker,
    up to the two accruals in ClickHouse."""
    reference = secured.work_dir / "reference.json"
    reference.write_bytes(orjson.dumps(REFERENCE))
    loaded = secured.attribution("admin", "load-reference", str(reference))
    assert loaded.returncode == 0, loaded.stderr
    produced = secured.attribution("producer", "produce", str(secured.jsonl("events.jsonl", EVENTS)))
    assert produced.returncode == 0, produced.stderr
    assert "total sent 4" in produced.stdout
    secured.worker.worker().start()
    secured.worker.wait_for("SELECT count() FROM {db}.commission_facts FINAL", lambda n: n == 2)
    return secured


def test_the_secrets_are_files_only_their_owner_reads(secured: SecuredPipeline) -> None:
    security = secured.stack.kafka.security
    assert stat.S_IMODE(security.dir.stat().st_mode) == 0o700
    for principal in PRINCIPALS:
        assert stat.S_IMODE(security.password_file(principal).stat().st_mode) == 0o600
    assert stat.S_IMODE(security.keystore.stat().st_mode) == 0o600
    assert "password" not in secured.stack.kafka.properties_file.read_text()


def test_stack_env_names_the_password_file_and_never_prints_the_password(
    secured: SecuredPipeline,
) -> None:
    env = dict(os.environ, ATTRIBUTION_STACK_DIR=str(secured.stack.root))

    printed = subprocess.run(
        [sys.executable, "-m", "attribution", "stack", "env", "--principal", "producer"],
        env=env, capture_output=True, text=True, timeout=60, cwd=REPO)

    assert printed.returncode == 0, printed.stderr
    security = secured.stack.kafka.security
    exports = dict(line.removeprefix("export ").split("=", 1) for line in printed.stdout.splitlines())
    assert exports["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert exports["KAFKA_SASL_USERNAME"] == "producer"
    assert exports["KAFKA_SASL_PASSWORD_FILE"] == str(security.password_file("producer"))
    assert exports["KAFKA_SSL_CAFILE"] == str(security.ca_file)
    assert exports["KAFKA_SASL_PASSWORD"] == "''"
    for principal in PRINCIPALS:
        assert security.password(principal) not in printed.stdout + printed.stderr


def test_the_producer_is_refused_on_internal_topics_reviews_changelogs_and_dead_letters(
    running: SecuredPipeline,
) -> None:
    from streams import kafka_clients

    producer_config = running.config("producer")
    worker_config = running.config("worker")
    refused = [producer_config.topic(t) for t in ("ledger-events", "reviews", "dead-letters")]
    refused += [worker_config.changelog_topic(table) for table in STATE_TABLES]
    # Were any accepted, the worker would reject o-fast (a reversal fact) or refund o-paid.
    reject = {"event_id": "rv-forged", "type": "review", "ts": ts(2 * H), "order_id": "o-fast",
              "decision": "reject", "reviewer": "ann", "note": "forged"}
    refund = {"event_id": "r-forged", "type": "refund", "ts": ts(2 * H), "order_id": "o-paid",
              "amount": "100.00"}
    ends_before = _end_offsets(running, refused)

    producer = kafka_clients.producer(producer_config, acks="all", max_block_ms=10_000)
    try:
        for topic in refused:
            value = reject if topic.endswith("reviews") else refund
            with pytest.raises(TopicAuthorizationFailedError):
                producer.send(topic, orjson.dumps(value), key=b"o-fast").get(timeout=30)
    finally:
        producer.close(timeout=10)
    review = running.attribution("producer", "review", "o-fast", "--reject", "--reviewer", "ann")
    assert review.returncode == 1, review.stdout + review.stderr
    assert "1 of 1 records were not acknowledged" in review.stderr.replace("\n", "")
    # The reviewer writes reviews only: a refund from it is refused too.
    as_reviewer = running.attribution("reviewer", "produce", str(running.jsonl("r.jsonl", [refund])))
    assert as_reviewer.returncode == 1, as_reviewer.stdout + as_reviewer.stderr

    assert _end_offsets(running, refused) == ends_before
    assert set(running.facts()) == {"o-paid:accrual", "o-fast:accrual"}


def test_the_whole_pipeline_runs_over_sasl_ssl_each_principal_doing_its_part(
    running: SecuredPipeline,
) -> None:
    released = running.attribution("reviewer", "review", "o-fast", "--release", "--reviewer", "ann",
                                   "--note", "checked by phone")
    assert released.returncode == 0, released.stderr
    running.worker.wait_for("SELECT count() FROM {db}.reviews FINAL", lambda n: n == 1, 60)
    moved = running.attribution("producer", "produce",
                                str(running.jsonl("tick.jsonl", [TIME_MOVER])))
    assert moved.returncode == 0, moved.stderr

    running.worker.wait_for("SELECT count() FROM {db}.commission_facts FINAL",
                            lambda n: n >= len(EXPECTED_FACTS), 60)

    assert running.facts() == EXPECTED_FACTS  # and nothing from the refused attempts
    outcomes = running.worker.query("SELECT order_id, reviewer, outcome FROM {db}.reviews FINAL")
    assert outcomes == [("o-fast", "ann", "released")]


def test_up_secure_again_changes_nothing_and_brings_back_a_lost_scram_user(
    secured: SecuredPipeline,
) -> None:
    from kafka.admin import ScramMechanism, UserScramCredentialDeletion

    admin = secured.stack.kafka.plaintext_admin()
    try:
        admin.alter_user_scram_credentials(
            [UserScramCredentialDeletion("reviewer", ScramMechanism.SCRAM_SHA_512)])
    finally:
        admin.close()
    said: list[str] = []

    secured.stack.start_kafka(progress=said.append, secure=True, topic_prefix=secured.prefix)

    assert any("already running" in line for line in said)
    assert any("added the SCRAM users reviewer (admin API)" in line for line in said), said
    assert any(f"ACLs for TOPIC_PREFIX {secured.prefix!r} in place" in line for line in said), said
    _can_log_in(secured.config("reviewer"))


def _can_log_in(config: Config) -> None:
    from streams import kafka_clients

    deadline = time.monotonic() + 30
    while True:  # a new SCRAM credential reaches the listener through the metadata log
        try:
            admin = kafka_clients.admin(config, request_timeout_ms=5000)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        try:
            assert config.topic("reviews") in admin.list_topics()
            return
        finally:
            admin.close()


def _end_offsets(pipeline: SecuredPipeline, topics: list[str]) -> dict[Any, int]:
    from kafka import TopicPartition

    from streams import kafka_clients

    consumer = kafka_clients.consumer(pipeline.config("admin"), group_id=None)
    try:
        partitions = [TopicPartition(topic, p) for topic in topics
                      for p in consumer.partitions_for_topic(topic) or ()]
        assert len(partitions) == 2 * len(topics)
        return dict(consumer.end_offsets(partitions))
    finally:
        consumer.close()
