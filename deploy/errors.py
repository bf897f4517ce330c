"""The one error the local stack raises.

Its message is a single line a developer can act on: what failed, the cause, and where to look
(a log path or a command to run). Callers print it as is; they never need a traceback.
"""

from __future__ import annotations


class StackError(RuntimeError):
    """The local Kafka/ClickHouse stack could not be brought to the requested state."""
