"""The project's Kafka topics, created explicitly (the broker runs with auto-create off).

Every topic the worker reads or writes is created here, honouring `TOPIC_PREFIX` and the
partition count, the state stores' changelogs included: every input and internal topic must have
the same partition count, since partition p of each belongs to one worker (co-partitioning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kafka.admin import NewTopic
from kafka.errors import (
    ClusterAuthorizationFailedError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    for_code,
)

from schemas.config import (
    ABUSE_FLAGS_TOPIC,
    CODE_EVENTS_TOPIC,
    DEAD_LETTERS_TOPIC,
    INPUT_TOPICS,
    LEDGER_EVENTS_TOPIC,
    REFERENCE_TOPICS,
    REVIEWS_TOPIC,
    STATE_TABLES,
    VISITOR_EVENTS_TOPIC,
    Config,
)

from .kafka_clients import admin as kafka_admin

#: Reference topics keep the latest value per id forever: they are the source of truth that a
#: new worker reads from the beginning.
COMPACTED = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}
#: Table changelogs keep the latest value per key (Faust's own changelog settings).
CHANGELOG = {"cleanup.policy": "compact"}
#: Dead letters are kept 30 days so an operator has time to look at them and replay.
DEAD_LETTER_RETENTION = {"retention.ms": str(30 * 24 * 3600 * 1000)}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(config: Config) -> list[TopicSpec]:
    n = config.partitions
    specs = [TopicSpec(config.topic(t), n) for t in INPUT_TOPICS]
    specs.append(TopicSpec(config.topic(DEAD_LETTERS_TOPIC), n, DEAD_LETTER_RETENTION))
    # One partition: reference data is small and is read whole by every worker.
    specs += [TopicSpec(config.topic(t), 1, COMPACTED) for t in REFERENCE_TOPICS]
    specs.append(TopicSpec(config.topic(VISITOR_EVENTS_TOPIC), n))
    specs.append(TopicSpec(config.topic(LEDGER_EVENTS_TOPIC), n))
    specs.append(TopicSpec(config.topic(CODE_EVENTS_TOPIC), n))
    specs.append(TopicSpec(config.topic(REVIEWS_TOPIC), n))
    specs.append(TopicSpec(config.topic(ABUSE_FLAGS_TOPIC), n))
    # Co-partitioned with the topics that update them; compacted like Faust's own.
    specs += [TopicSpec(config.changelog_topic(t), n, CHANGELOG) for t in STATE_TABLES]
    return specs


#: Refusals that mean "this principal may not create (or even see) the topic", not "failed":
#: on a secured broker a producer sees only the topics it writes, and the ones it may not
#: create were created by an operator or the worker. A topic that is really missing still
#: fails the send that needs it, and that failure is counted.
_NOT_OURS_TO_CREATE = (TopicAuthorizationFailedError, ClusterAuthorizationFailedError)


def ensure_topics(config: Config, progress: Callable[[str], None] = lambda _: None) -> list[str]:
    """Create the topics that do not exist yet (and that this principal may create); returns
    the names created."""
    admin = kafka_admin(config, client_id="attribution-admin")
    try:
        existing = set(admin.list_topics())  # only those this principal may describe
        missing = [spec for spec in topic_specs(config) if spec.name not in existing]
        if not missing:
            return []
        new = [
            NewTopic(s.name, s.partitions, config.replication_factor, topic_configs=s.config)
            for s in missing
        ]
        response = admin.create_topics(new, timeout_ms=30_000, raise_errors=False)
        created = []
        for result in response["topics"]:
            error = for_code(result["error_code"])
            if error is TopicAlreadyExistsError or issubclass(error, _NOT_OURS_TO_CREATE):
                continue  # created meanwhile by another process, or not this principal's to make
            if error.errno != 0:
                raise error(f"cannot create topic {result['name']}: {result.get('error_message')}")
            created.append(result["name"])
        by_name = {spec.name: spec for spec in missing}
        for name in created:
            progress(f"created topic {name} ({by_name[name].partitions} partitions)")
        return created
    finally:
        admin.close()


class NotCopartitioned(RuntimeError):
    """The topics a worker joins on do not have the partition count it was configured with."""


def check_copartitioned(config: Config) -> None:
    """Refuse to run unless every topic of `topic_specs` with `config.partitions` partitions has
    exactly that many: partition p of every such topic must hold the same keys."""
    wanted = {spec.name for spec in topic_specs(config) if spec.partitions == config.partitions}
    admin = kafka_admin(config, client_id="attribution-admin")
    try:
        described = admin.describe_topics(sorted(wanted))
    finally:
        admin.close()
    wrong = {t["name"]: len(t["partitions"]) for t in described if t["error_code"] == 0
             if len(t["partitions"]) != config.partitions}
    if wrong:
        listed = ", ".join(f"{name} has {count}" for name, count in sorted(wrong.items()))
        raise NotCopartitioned(
            f"ATTRIBUTION_PARTITIONS is {config.partitions} but {listed}: every input and internal"
            " topic needs that many partitions (partition p of each belongs to one worker)")
