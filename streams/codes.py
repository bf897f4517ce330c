"""Stage 2b: code velocity, keyed by the normalised discount code.

Reads `code-events`: the join stage's decided orders that used a discount code (any code, whoever
it attributed the order to: velocity counts every customer who used the code). Per code, the
`code-redemptions` table keeps the recent uses (order ts, customer_id) together with the
`code-events` offset that recorded each one. An order at offset X only sees uses recorded below X
(plus itself), so a replay after a crash decides exactly as the first run did, like the touches of
the join stage. Adds `code_velocity` when due (re-deriving the accrual's status) and forwards every
order, flagged or not, to `ledger-events` keyed by order_id.

Writes nothing to ClickHouse: its output is the forward, which Faust flushes before it commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import orjson
from faust.types import EventT, TableT, TopicT

from schemas.facts import CodeRedemptions
from schemas.internal import DecidedOrder
from schemas.reference import ReferenceData, normalise_code

from .context import in_partition
from .rules.abuse import record_redemption, velocity_flag, velocity_horizon, with_flags

#: A stored use: [order ts (epoch seconds), customer_id, code-events offset that recorded it].
StoredUse = list[Any]


@dataclass
class CodeState:
    code: str
    uses: list[StoredUse]
    partition: int
    dirty: bool = False

    def redemptions(self, below_offset: int | None = None) -> CodeRedemptions:
        """The uses as the pure rule sees them; only those recorded below `below_offset` if given."""
        return CodeRedemptions(
            self.code,
            tuple(
                (datetime.fromtimestamp(ts, timezone.utc), customer)
                for ts, customer, offset in self.uses
                if below_offset is None or offset < below_offset
            ),
        )

    def remember(self, ts: datetime, customer_id: str, offset: int, window: timedelta) -> None:
        """Record one use (a no-op for a use already recorded), forgetting what can no longer count."""
        offsets = {(datetime.fromtimestamp(t, timezone.utc), c): o for t, c, o in self.uses}
        offsets.setdefault((ts, customer_id), offset)
        kept = record_redemption(self.redemptions(), ts, customer_id, window)
        self.uses = [[t.timestamp(), c, offsets[(t, c)]] for t, c in kept.redemptions]
        self.dirty = True


@dataclass
class CodeStage:
    topic_name: str
    table: TableT
    ledger_events: TopicT
    reference: Callable[[], ReferenceData]

    async def process(self, events: Sequence[EventT]) -> None:
        ref = self.reference()
        window = velocity_horizon(ref)
        codes: dict[str, CodeState] = {}

        def state_of(code: str, partition: int) -> CodeState:
            state = codes.get(code)
            if state is None:
                with in_partition(self.topic_name, partition):
                    stored = self.table.get(code.encode())
                state = CodeState(code, orjson.loads(stored) if stored else [], partition)
                codes[code] = state
            return state

        for event in events:
            message = event.message
            decided = DecidedOrder.from_dict(orjson.loads(message.value or b"{}"))
            state = state_of(normalise_code(decided.discount_code), message.partition)
            seen = record_redemption(
                state.redemptions(below_offset=message.offset), decided.ts, decided.customer_id,
                window,
            )
            flag = velocity_flag(decided, seen, ref)
            if flag is not None:
                decided = with_flags(decided, [flag])
            state.remember(decided.ts, decided.customer_id, message.offset, window)
            await self.ledger_events.send(
                key=decided.order_id.encode(), value=decided.to_json(),
                timestamp=message.timestamp, key_serializer="raw", value_serializer="raw",
            )

        for code, state in codes.items():
            if state.dirty:
                with in_partition(self.topic_name, state.partition):
                    self.table[code.encode()] = orjson.dumps(state.uses)
