"""A worker's state: per store and partition, RocksDB on disk, every write also in a changelog.

Stores hold JSON values keyed by bytes (a visitor's touches, a code's uses, an order's ledger
entry). A batch reads through `Staged`, which keeps its writes apart until the batch's effects
are made: the changelog records are acknowledged by the broker first, then the batch is written
to RocksDB in one `WriteBatch`, then offsets are committed. So the changelog always holds at
least what RocksDB holds, and a crash at any point replays the batch onto state that is either
the old one or already the new one (the stages are idempotent for both).

Restoring a partition (after an assignment) reads its changelog from the offset recorded beside
the database (the *checkpoint*, written after each batch) to the end. With no database, or after
the state directory was wiped, it reads the whole changelog.

This module must never write RocksDB before the changelog acknowledged the same writes.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

from rocksdict import Options, Rdict, WriteBatch

log = logging.getLogger(__name__)

#: Bound the memory of one database (a worker opens 3 x its partitions of them): two 4 MiB
#: memtables; the OS page cache serves hot blocks, the state itself stays on disk.
WRITE_BUFFER_BYTES = 4 * 1024 * 1024
MAX_WRITE_BUFFERS = 2


class KeyValue(Protocol):
    """What a stage reads: one store partition."""

    def get(self, key: bytes) -> bytes | None: ...

    def items(self) -> Iterator[tuple[bytes, bytes]]: ...


class Staged:
    """A store partition seen through one batch's not-yet-made writes."""

    def __init__(self, base: KeyValue) -> None:
        self.base = base
        self.writes: dict[bytes, bytes | None] = {}

    def get(self, key: bytes) -> bytes | None:
        if key in self.writes:
            return self.writes[key]
        return self.base.get(key)

    def put(self, key: bytes, value: bytes | None) -> None:
        """`None` deletes the key."""
        self.writes[key] = value

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key, value in self.base.items():
            if key not in self.writes:
                yield key, value
        for key, staged in self.writes.items():
            if staged is not None:
                yield key, staged


class MemoryStore:
    """A store partition in memory (unit tests, and the shape every store has)."""

    def __init__(self, data: Mapping[bytes, bytes] | None = None) -> None:
        self.data: dict[bytes, bytes] = dict(data or {})

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self.data.items()))

    def write(self, writes: Mapping[bytes, bytes | None]) -> None:
        for key, value in writes.items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value


class PartitionStore:
    """One store's partition on disk, with the changelog offset it reflects."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.parent.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_write_buffer_size(WRITE_BUFFER_BYTES)
        options.set_max_write_buffer_number(MAX_WRITE_BUFFERS)
        self._options = options
        self.db = Rdict(str(directory), options)

    @property
    def _checkpoint_file(self) -> Path:
        return self.directory.with_name(self.directory.name + ".checkpoint")

    def checkpoint(self) -> int:
        """The changelog offset this database has applied up to (exclusive); 0 if unknown."""
        try:
            return int(self._checkpoint_file.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def get(self, key: bytes) -> bytes | None:
        value = self.db.get(key)
        return value if value is None else bytes(value)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key, value in self.db.items():
            yield bytes(key), bytes(value)  # type: ignore[arg-type]  # raw mode: always bytes

    def write(self, writes: Mapping[bytes, bytes | None], changelog_next: int | None = None) -> None:
        """Apply `writes` at once; `changelog_next`: the changelog offset they bring it up to."""
        if writes:
            batch = WriteBatch(raw_mode=True)
            for key, value in writes.items():
                if value is None:
                    batch.delete(key)
                else:
                    batch.put(key, value)
            self.db.write(batch)
        if changelog_next is not None and changelog_next > self.checkpoint():
            # After the data: a crash in between only makes the next restore read a little more.
            tmp = self._checkpoint_file.with_suffix(".tmp")
            tmp.write_text(str(changelog_next))
            tmp.replace(self._checkpoint_file)

    def wipe(self) -> None:
        """Forget everything (the changelog was emptied or is behind the checkpoint)."""
        self.db.close()
        Rdict.destroy(str(self.directory), self._options)
        shutil.rmtree(self.directory, ignore_errors=True)
        self._checkpoint_file.unlink(missing_ok=True)
        self.db = Rdict(str(self.directory), self._options)

    def close(self) -> None:
        self.db.close()
