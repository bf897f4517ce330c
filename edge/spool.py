"""The edge's bounded on-disk spool: events Kafka did not acknowledge, kept until it does (§8).

A spool is a directory of segment files, `<sequence>.seg`, written in order and replayed in order.
Each record in a segment is one `append()`: a header (payload length, CRC-32 of the payload) and
the payload (when it was spooled, then each event's topic, key and value). An append is fsynced
before it returns, so a `2xx` given after it survives `kill -9` and a power cut.

After `kill -9` the newest segment may end in a torn record: `open()` finds the first record whose
length or checksum does not hold, drops it and everything after it in that segment (truncating the
file), and says so in the log. It never raises on what it finds on disk.

This module does disk I/O only; it never talks to Kafka, and its methods block (the delivery calls
them in a thread). One thread at a time: a lock serialises them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Record header: payload length, CRC-32 of the payload (big-endian, unsigned).
_HEADER = struct.Struct(">II")
#: Payload start: when the record was spooled (Unix ms), how many events it holds.
_RECORD_START = struct.Struct(">QI")
_TOPIC_LENGTH = struct.Struct(">H")
_BYTES_LENGTH = struct.Struct(">I")
#: A new segment after this many bytes: replay deletes a whole segment once Kafka acknowledged
#: all of it, so this is how much is sent again at most after a crash mid-replay.
SEGMENT_BYTES = 16 * 1024 * 1024
_SUFFIX = ".seg"
#: Room a spool must have left to say it has room (readiness): a whole request of the edge's
#: largest kind (a 256 KiB POST /v1/events), so a ready edge does not answer it 503.
READY_HEADROOM_BYTES = 256 * 1024


@dataclass(frozen=True)
class EdgeEvent:
    """One validated event bound for Kafka (edge.delivery re-exports it)."""

    topic: str  # "clicks" | "shares" | "orders" | "refunds": before TOPIC_PREFIX
    key: bytes  # visitor_id (refunds: order_id; shares: affiliate_id)
    value: bytes  # the event's JSON object


class SpoolFull(Exception):
    """The spool has no room for these events: answer 503 and ask the client to come back."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the edge's spool is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Segment:
    path: Path
    sequence: int
    bytes: int = 0
    events: int = 0
    oldest_ms: int | None = None  # when its first record was spooled


def encode_record(events: Sequence[EdgeEvent], spooled_ms: int) -> bytes:
    parts = [_RECORD_START.pack(spooled_ms, len(events))]
    for event in events:
        topic = event.topic.encode()
        parts += [_TOPIC_LENGTH.pack(len(topic)), topic,
                  _BYTES_LENGTH.pack(len(event.key)), event.key,
                  _BYTES_LENGTH.pack(len(event.value)), event.value]
    payload = b"".join(parts)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> tuple[int, list[EdgeEvent]]:
    spooled_ms, count = _RECORD_START.unpack_from(payload, 0)
    at = _RECORD_START.size
    events = []
    for _ in range(count):
        (length,) = _TOPIC_LENGTH.unpack_from(payload, at)
        at += _TOPIC_LENGTH.size
        topic = payload[at:at + length].decode()
        at += length
        (length,) = _BYTES_LENGTH.unpack_from(payload, at)
        at += _BYTES_LENGTH.size
        key = payload[at:at + length]
        at += length
        (length,) = _BYTES_LENGTH.unpack_from(payload, at)
        at += _BYTES_LENGTH.size
        value = payload[at:at + length]
        at += length
        events.append(EdgeEvent(topic, key, value))
    if at != len(payload):
        raise ValueError("payload has bytes after its last event")
    return spooled_ms, events


def read_records(data: bytes) -> tuple[list[tuple[int, list[EdgeEvent]]], int]:
    """The whole records at the start of a segment's bytes, and where the first bad one starts
    (len(data) when every record is whole)."""
    records = []
    at = 0
    while at < len(data):
        if at + _HEADER.size > len(data):
            break
        length, crc = _HEADER.unpack_from(data, at)
        payload = data[at + _HEADER.size:at + _HEADER.size + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            break
        try:
            records.append(_decode_payload(payload))
        except (struct.error, UnicodeDecodeError, ValueError):
            break  # a checksum that matched garbage: treated as torn as well
        at += _HEADER.size + length
    return records, at


class Spool:
    """Events in the order they were appended, on disk, at most `max_bytes` of them."""

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._segments: list[_Segment] = []
        self._file: int | None = None  # the newest segment's descriptor, open for appending
        self._lock_file: int | None = None  # held while open: one process per spool directory
        self._lock = threading.Lock()

    # --- what the metrics and the readiness probe read ----------------------------------

    @property
    def bytes(self) -> int:
        return sum(segment.bytes for segment in self._segments)

    @property
    def events(self) -> int:
        return sum(segment.events for segment in self._segments)

    @property
    def empty(self) -> bool:
        return not any(segment.events for segment in self._segments)

    def oldest_age_seconds(self, now: float | None = None) -> float:
        """How long the oldest spooled event has waited (0 when the spool is empty)."""
        oldest = next((s.oldest_ms for s in self._segments if s.oldest_ms is not None), None)
        if oldest is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - oldest / 1000)

    def has_room(self) -> bool:
        """Room for another whole request (READY_HEADROOM_BYTES, or a tenth of a small spool)."""
        return self.max_bytes - self.bytes >= min(READY_HEADROOM_BYTES, self.max_bytes // 10)

    # --- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        """Find what a previous process left, dropping a torn tail; appends go to a new segment."""
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._hold_directory()
            self._segments = []
            for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
                try:
                    sequence = int(path.stem)
                except ValueError:
                    continue  # not ours
                segment = self._scan(path, sequence)
                if segment.events:
                    self._segments.append(segment)
                else:
                    path.unlink()
            self._roll()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                os.close(self._file)
                self._file = None
            if self._segments and not self._segments[-1].events:
                self._segments.pop().path.unlink(missing_ok=True)
            if self._lock_file is not None:
                os.close(self._lock_file)  # releases the lock
                self._lock_file = None

    def _hold_directory(self) -> None:
        """Two processes appending to one spool would interleave their segments: the second
        one to open it is refused (the lock dies with its process, kill -9 included)."""
        if self._lock_file is not None:
            return
        descriptor = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise RuntimeError(f"the spool {self.directory} is in use by another process: give "
                               "each edge an EDGE_SPOOL_DIR of its own") from None
        self._lock_file = descriptor

    def _scan(self, path: Path, sequence: int) -> _Segment:
        data = path.read_bytes()
        records, whole = read_records(data)
        if whole < len(data):
            log.warning("spool segment %s: dropped a torn or corrupt record and the %d bytes "
                        "after it (a write cut short by a crash)", path.name, len(data) - whole)
            with path.open("r+b") as file:
                file.truncate(whole)
                os.fsync(file.fileno())
        segment = _Segment(path, sequence, bytes=whole,
                           events=sum(len(events) for _, events in records))
        if records:
            segment.oldest_ms = records[0][0]
        return segment

    def _roll(self) -> None:
        """Start a new newest segment (the previous one is complete from now on)."""
        if self._file is not None:
            os.close(self._file)
            self._file = None
        sequence = self._segments[-1].sequence + 1 if self._segments else 1
        path = self.directory / f"{sequence:020d}{_SUFFIX}"
        self._file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_directory(self.directory)  # the new name survives a crash too
        self._segments.append(_Segment(path, sequence))

    # --- writing ------------------------------------------------------------------------

    def append(self, batches: Sequence[Sequence[EdgeEvent]]) -> int:
        """Append each batch as one record, in order, and fsync once; returns how many batches
        fitted (a batch that does not fit, and every one after it, is not written)."""
        with self._lock:
            assert self._file is not None, "open() the spool first"
            now_ms = int(time.time() * 1000)
            room = self.max_bytes - self.bytes
            records = []
            for batch in batches:
                record = encode_record(batch, now_ms)
                if len(record) > room:
                    break
                room -= len(record)
                records.append((record, len(batch)))
            if not records:
                return 0
            segment = self._segments[-1]
            self._write(segment, memoryview(b"".join(record for record, _ in records)))
            segment.bytes += sum(len(record) for record, _ in records)
            segment.events += sum(count for _, count in records)
            if segment.oldest_ms is None:
                segment.oldest_ms = now_ms
            if segment.bytes >= self.segment_bytes:
                self._roll()
            return len(records)

    def _write(self, segment: _Segment, data: memoryview) -> None:
        """Write and fsync all of `data`, or leave the segment as it was and raise. A record cut
        short (a full disk) must not stay in front of later appends: reading stops at the first
        bad record, so everything appended after it would be dropped on the next open."""
        assert self._file is not None
        try:
            view = data
            while view:
                view = view[os.write(self._file, view):]
            os.fsync(self._file)
        except OSError:
            try:
                os.ftruncate(self._file, segment.bytes)
            except OSError:
                self._roll()  # the cut record stays last in its segment, dropped on open
            raise

    # --- replaying ----------------------------------------------------------------------

    def oldest(self) -> tuple[int, list[list[EdgeEvent]]] | None:
        """The oldest segment's sequence and records, or None when nothing is spooled. If that
        is the segment being appended to, it is completed first (new appends go to a new one)."""
        with self._lock:
            while self._segments and not self._segments[0].events and len(self._segments) > 1:
                self._segments.pop(0).path.unlink(missing_ok=True)
            if not self._segments or not self._segments[0].events:
                return None
            if len(self._segments) == 1:
                self._roll()
            segment = self._segments[0]
            records, _ = read_records(segment.path.read_bytes()[:segment.bytes])
            return segment.sequence, [events for _, events in records]

    def remove(self, sequence: int) -> None:
        """Forget a segment Kafka acknowledged all of."""
        with self._lock:
            for index, segment in enumerate(self._segments):
                if segment.sequence == sequence:
                    assert index < len(self._segments) - 1, "the newest segment is never removed"
                    del self._segments[index]
                    segment.path.unlink(missing_ok=True)
                    _fsync_directory(self.directory)
                    return


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
