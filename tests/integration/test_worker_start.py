"""A worker refuses to start on topics that are not co-partitioned (the join would be wrong)."""

from __future__ import annotations

import pytest
from kafka.admin import KafkaAdminClient, NewPartitions

pytestmark = pytest.mark.integration


def test_a_worker_refuses_topics_whose_partition_count_differs_and_names_them(isolated):
    config = isolated.config
    admin = KafkaAdminClient(bootstrap_servers=config.kafka_bootstrap)
    try:  # an operator grew `orders` by hand: its partition p no longer holds clicks/p's visitors
        admin.create_partitions({config.topic("orders"): NewPartitions(config.partitions + 2)})
    finally:
        admin.close()

    worker = isolated.worker().start()
    assert worker.process is not None
    worker.expect_exit = True
    assert worker.process.wait(timeout=60) == 2
    log = worker.log_path.read_text(errors="replace")
    assert f"{config.topic('orders')} has {config.partitions + 2}" in log
    assert "ATTRIBUTION_PARTITIONS" in log
