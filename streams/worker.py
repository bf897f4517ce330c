"""Run the stream processor: topics, metrics endpoint, reference data, then the engine (blocks).

Error policy: invalid input goes to dead-letters (never an exception); ClickHouse unreachable is
retried in place by the sink, a broker that is down or moving leaders by the engine (and waited
for at start-up); anything else is fatal: logged, then the process exits at once
with status 70 *without* committing, so the batch is processed again after a restart.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time

from kafka.errors import KafkaConnectionError, KafkaTimeoutError

from schemas.config import (
    CODE_EVENTS_TOPIC,
    INPUT_TOPICS,
    LEDGER_EVENTS_TOPIC,
    REVIEWS_TOPIC,
    VISITOR_EVENTS_TOPIC,
    Config,
)
from sinks.metrics import serve

from .engine.runner import Engine
from .lag import run_lag_reporter
from .reference import ReferenceReader
from .topics import NotCopartitioned, check_copartitioned, ensure_topics

log = logging.getLogger(__name__)

#: Exit status of a worker stopped by an error it must not skip past (EX_SOFTWARE).
FATAL_EXIT_CODE = 70
#: How long a starting worker waits for a broker that does not answer (an outage, a broker
#: restarting beside it) before it gives up.
START_WAIT_SECONDS = 300

_LEVELS = {"crit": logging.CRITICAL, "error": logging.ERROR, "warn": logging.WARNING,
           "info": logging.INFO, "debug": logging.DEBUG}


def fatal(exc: BaseException) -> None:
    log.critical("fatal error, stopping without committing offsets: %r", exc, exc_info=exc)
    logging.shutdown()
    os._exit(FATAL_EXIT_CODE)


def run_worker(config: Config, loglevel: str = "info") -> None:
    logging.basicConfig(
        level=_LEVELS.get(loglevel, logging.INFO),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    )
    # aiokafka logs every group join and fetch reset at INFO: keep the worker's log readable.
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, _LEVELS.get(loglevel, 20)))
    _ensure_topics_once_kafka_answers(config)
    try:
        check_copartitioned(config)
    except NotCopartitioned as exc:
        log.critical("%s", exc)
        raise SystemExit(2) from None
    serve(config.metrics_port)
    asyncio.run(_run(config))


def _ensure_topics_once_kafka_answers(config: Config) -> None:
    """Create missing topics, waiting up to START_WAIT_SECONDS for a broker that does not answer
    yet: a worker restarted during a broker outage waits it out instead of crash-looping; a
    bootstrap address that never answers still ends in a clear error (exit 1)."""
    deadline = time.monotonic() + START_WAIT_SECONDS
    delay = 1.0
    while True:
        try:
            ensure_topics(config, progress=log.info)
            return
        except (KafkaTimeoutError, KafkaConnectionError) as exc:
            if time.monotonic() + delay > deadline:
                log.critical("Kafka at %s did not answer for %d s: %r", config.kafka_bootstrap,
                             START_WAIT_SECONDS, exc)
                raise SystemExit(1) from None
            log.warning("Kafka at %s does not answer (%r); trying again in %.0f s",
                        config.kafka_bootstrap, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _run(config: Config) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    reference = ReferenceReader(config)
    topics = [config.topic(t) for t in (*INPUT_TOPICS, REVIEWS_TOPIC, VISITOR_EVENTS_TOPIC,
                                        CODE_EVENTS_TOPIC, LEDGER_EVENTS_TOPIC)]
    background = [
        asyncio.create_task(_guarded(reference.run()), name="reference"),
        # Telemetry only: run_lag_reporter logs and retries its own errors and never raises.
        asyncio.create_task(run_lag_reporter(config, topics), name="lag"),
    ]
    try:
        ready = asyncio.create_task(reference.ready.wait())
        stop = asyncio.create_task(stopping.wait())
        await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stop.cancel()
        if stopping.is_set():
            return
        log.info("worker started: group %s, %d partitions", config.app_id, config.partitions)
        # What start-up built (modules, reference data) lives as long as the process: keep it out
        # of every later collection, and collect the young generation less often (a batch
        # allocates hundreds of thousands of short-lived objects).
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        try:
            await Engine(config, reference).run(stopping)
        except Exception as exc:  # noqa: BLE001 - must not commit past it
            fatal(exc)
        log.info("worker stopped")
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)


def _dump_tasks() -> None:
    """`kill -USR1 <pid>`: log where every task of the worker is waiting (a stall's first clue)."""
    for task in asyncio.all_tasks():
        chain: list[str] = []
        awaitable: object = task.get_coro()
        while awaitable is not None and len(chain) < 30:
            frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
            if frame is not None:
                chain.append(f"{frame.f_code.co_name} "
                             f"({frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno})")
            awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
        log.warning("task %s: %s", task.get_name(), " -> ".join(chain) or "not started")


async def _guarded(coroutine: object) -> None:
    try:
        await coroutine  # type: ignore[misc]
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001
        fatal(exc)
