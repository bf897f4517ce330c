"""Reference data (programs, affiliates, settings) read from the compacted topics.

Every worker reads every reference partition from the beginning with a group-less consumer, so each
holds the whole, current `ReferenceData`. Agents wait for `ready` (the initial load reached the end
offsets seen at start) before they process events, and then see each update as soon as it is read.
A bad record in a reference topic is logged and skipped; it never stops the worker.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiokafka import AIOKafkaConsumer

from schemas.config import Config
from schemas.reference import Affiliate, Program, ReferenceData, Settings
from schemas.validation import InvalidReference, parse_affiliate, parse_program, parse_settings
from sinks.metrics import METRICS

from .kafka_clients import aio_consumer
from .kafka_meta import partitions_of

log = logging.getLogger(__name__)


class ReferenceReader:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.snapshot = ReferenceData()
        self.ready = asyncio.Event()
        self._programs: dict[str, Program] = {}
        self._affiliates: dict[str, Affiliate] = {}
        self._settings = Settings()
        self._settings_loaded = False
        self._topics = {
            config.topic("ref-programs"): self._apply_program,
            config.topic("ref-affiliates"): self._apply_affiliate,
            config.topic("ref-settings"): self._apply_settings,
        }

    async def run(self) -> None:
        consumer: AIOKafkaConsumer = aio_consumer(
            self.config,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"{self.config.app_id}-reference",
        )
        await consumer.start()
        try:
            partitions = [tp for topic in self._topics for tp in await partitions_of(consumer, topic)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            initial_end = await consumer.end_offsets(partitions)
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
                changed = False
                for tp, messages in batches.items():
                    for message in messages:
                        changed |= self._apply(tp.topic, message.key, message.value)
                if changed:
                    self.snapshot = ReferenceData(
                        programs=dict(self._programs),
                        affiliates=dict(self._affiliates),
                        settings=self._settings,
                    )
                    self._export()
                if not self.ready.is_set():
                    positions = {tp: await consumer.position(tp) for tp in partitions}
                    if all(positions[tp] >= initial_end[tp] for tp in partitions):
                        log.info(
                            "reference data loaded: %d programs, %d affiliates",
                            len(self._programs), len(self._affiliates),
                        )
                        if not self._programs:
                            log.warning(
                                "no program is loaded (topic %s is empty): every order will be "
                                "written unattributed until `attribution load-reference` runs",
                                self.config.topic("ref-programs"))
                        self._export()
                        self.ready.set()
        finally:
            await consumer.stop()

    def _export(self) -> None:
        METRICS.reference_loaded.labels("programs").set(len(self._programs))
        METRICS.reference_loaded.labels("affiliates").set(len(self._affiliates))
        METRICS.reference_loaded.labels("settings").set(1 if self._settings_loaded else 0)

    def _apply(self, topic: str, key: bytes | None, value: bytes | None) -> bool:
        handler = self._topics[topic]
        try:
            handler(key.decode() if key else "", value)
        except (InvalidReference, ValueError, KeyError, TypeError) as exc:
            log.error("skipping bad reference record on %s key %r: %s", topic, key, exc)
            return False
        return True

    def _apply_program(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._programs.pop(key, None)
            return
        program = parse_program(orjson.loads(value))
        self._programs[program.program_id] = program

    def _apply_affiliate(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._affiliates.pop(key, None)
            return
        affiliate = parse_affiliate(orjson.loads(value))
        self._affiliates[affiliate.affiliate_id] = affiliate

    def _apply_settings(self, key: str, value: bytes | None) -> None:
        self._settings = Settings() if value is None else parse_settings(orjson.loads(value))
        self._settings_loaded = value is not None
