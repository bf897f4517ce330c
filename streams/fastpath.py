"""Faust's fetch loop without two tasks and four futures per record.

Faust 0.15 hands every fetched record to the conductor through `Service.wait_first(callback,
suspend_flow.wait())`: per record it creates four futures (the callback, the suspend event, the
service's stopped and crashed events), waits on them with `asyncio.wait` and cancels the losers.
That is most of what a Faust agent costs per record: a bare `take_events` agent read 5,700
records/s here, and 12,000-15,100/s with the loop below (same machine, back to back:
`python -m loadtests.fetch_loop`).

The loop is Faust's `Consumer._drain_messages` with one change: while flow is not suspended (no
rebalance), the callback is awaited directly. If the flow is suspended while a callback waits for
room in a full queue, the record is delivered when the flow resumes instead of abandoned; after
a rebalance such a record can be stale, which the commit ledger handles like any out-of-place
record (streams/offsets.py: not admitted unless it is exactly the partition's next offset; its
partition is re-read if it raised Faust's read offset). Faust's own gap bookkeeping is left out:
the commit ledger never reads it.

Installed per consumer instance, and only on the faust-streaming versions it was copied from;
on others the worker logs that it runs Faust's own loop.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import AsyncIterator
from typing import Any, cast

import faust

log = logging.getLogger(__name__)

#: faust-streaming versions whose `Consumer._drain_messages` this loop was copied from.
COPIED_FROM = ("0.15.",)
#: Let other tasks run at least every this many records (Faust's own value).
YIELD_EVERY = 100


async def drain_messages(self: Any, fetcher: Any) -> None:  # pragma: no cover - I/O loop
    from faust.transport.consumer import CONSUMER_FETCHING

    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    suspend_flow = self.suspend_flow
    since_yield = 0
    sleep = asyncio.sleep
    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(CONSUMER_FETCHING)
            records = cast(AsyncIterator, getmany(timeout=1.0))
            await self.sleep(0)
            if not self.should_stop:
                async for tp, message in records:
                    since_yield += 1
                    if since_yield > YIELD_EVERY:
                        await sleep(0)
                        since_yield = 0
                    offset = message.offset
                    read_offset = get_read_offset(tp)
                    if read_offset is None or offset >= read_offset:
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        if suspend_flow.is_set():
                            await self.wait_first(callback(message), suspend_flow.wait())
                        else:
                            await callback(message)
                        set_read_offset(tp, offset)
                unset_flag(CONSUMER_FETCHING)
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(CONSUMER_FETCHING)


def install(consumer: Any) -> bool:
    """Use the loop above for `consumer`; False (and Faust's loop) on an unknown Faust version."""
    version = getattr(faust, "__version__", "")
    if not version.startswith(COPIED_FROM):
        log.warning("faust-streaming %s: running Faust's own fetch loop (the fast one was copied"
                    " from %s)", version, ", ".join(f"{v}x" for v in COPIED_FROM))
        return False
    consumer._drain_messages = types.MethodType(drain_messages, consumer)  # noqa: SLF001
    return True
