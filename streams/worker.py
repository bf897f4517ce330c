"""Run the stream processor: topics, metrics endpoint, then the Faust worker (blocks)."""

from __future__ import annotations

import faust

from schemas.config import Config
from sinks.metrics import serve

from .app import create_app
from .topics import ensure_topics


def run_worker(config: Config, loglevel: str = "info") -> None:
    ensure_topics(config)
    serve(config.metrics_port)
    app = create_app(config)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    # No terminal spinner: at --loglevel warn and above Faust installs it as a DEBUG handler on
    # the root logger, so every debug call of aiokafka and Faust (several per record sent)
    # builds a log record: ~4 % of a busy worker's CPU, for a spinner nobody watches.
    worker.spinner = None
    worker.execute_from_commandline()
