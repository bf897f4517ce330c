"""The edge's on-disk spool: order, bounds, a torn tail after kill -9, and reopening."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge.spool import EdgeEvent, Spool, encode_record


def events(start: int, count: int, topic: str = "clicks") -> list[EdgeEvent]:
    return [EdgeEvent(topic, f"v{n}".encode(), b'{"event_id":"e%d"}' % n)
            for n in range(start, start + count)]


def replay_all(spool: Spool) -> list[EdgeEvent]:
    """Everything spooled, oldest first, removing each segment as a replay would."""
    replayed: list[EdgeEvent] = []
    while (oldest := spool.oldest()) is not None:
        sequence, records = oldest
        for record in records:
            replayed += record
        spool.remove(sequence)
    return replayed


def opened(directory: Path, max_bytes: int = 1 << 20, segment_bytes: int = 1 << 20) -> Spool:
    spool = Spool(directory, max_bytes, segment_bytes)
    spool.open()
    return spool


def test_events_come_back_in_the_order_they_were_appended_across_segments(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=300)
    appended: list[EdgeEvent] = []
    for n in range(0, 100, 5):
        batch = events(n, 5, topic="orders" if n % 2 else "clicks")
        assert spool.append([batch]) == 1
        appended += batch
    assert len(list(tmp_path.glob("*.seg"))) > 3
    assert spool.events == 100 and not spool.empty
    assert replay_all(spool) == appended
    assert spool.empty and spool.events == 0


def test_a_group_of_batches_is_one_fsync_and_keeps_their_order(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    assert spool.append([events(0, 2), events(2, 3), events(5, 1)]) == 3
    assert replay_all(spool) == events(0, 6)


def test_a_full_spool_takes_no_batch_that_does_not_fit_nor_any_after_it(tmp_path: Path) -> None:
    three = sum(len(encode_record(events(n, 10), 0)) for n in (0, 10, 20))
    spool = opened(tmp_path, max_bytes=three + three // 12)
    assert spool.has_room()
    assert spool.append([events(0, 10), events(10, 10), events(20, 10)]) == 3
    assert not spool.has_room()  # less than a tenth left: not ready for another request
    assert spool.append([events(30, 10), events(40, 1)]) == 0  # the first does not fit: neither
    assert spool.events == 30 and spool.bytes == three
    assert replay_all(spool) == events(0, 30)
    assert spool.append([events(30, 10)]) == 1  # replay freed room


def test_a_torn_record_at_the_end_is_dropped_on_open_and_the_rest_kept(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([events(0, 3)])
    spool.append([events(3, 3)])
    spool.close()
    segment = max(tmp_path.glob("*.seg"))
    whole = segment.stat().st_size
    torn = encode_record(events(6, 3), 0)
    with segment.open("ab") as file:
        file.write(torn[: len(torn) // 2])  # kill -9 mid-write

    reopened = opened(tmp_path)
    assert reopened.events == 6
    assert segment.stat().st_size == whole  # truncated to the last whole record
    assert replay_all(reopened) == events(0, 6)


def test_a_record_whose_checksum_fails_is_dropped_with_everything_after_it(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([events(0, 2)])
    spool.append([events(2, 2)])
    spool.close()
    segment = max(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    first = len(encode_record(events(0, 2), 0))
    data[first + 12] ^= 0xFF  # a byte inside the second record's payload
    segment.write_bytes(bytes(data))

    assert replay_all(opened(tmp_path)) == events(0, 2)


@pytest.mark.parametrize("garbage", [b"\x00", b"\x00\x00\x00\x05\x00", b"\xff" * 40])
def test_any_garbage_tail_is_survived(tmp_path: Path, garbage: bytes) -> None:
    spool = opened(tmp_path)
    spool.append([events(0, 1)])
    spool.close()
    with max(tmp_path.glob("*.seg")).open("ab") as file:
        file.write(garbage)
    assert replay_all(opened(tmp_path)) == events(0, 1)


def test_reopening_keeps_the_order_and_appends_after_what_was_there(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=200)
    for n in range(0, 20, 4):
        spool.append([events(n, 4)])
    for descriptor in (spool._file, spool._lock_file):  # noqa: SLF001 - as kill -9 leaves it:
        assert descriptor is not None                   # descriptors closed, nothing tidied
        os.close(descriptor)

    reopened = opened(tmp_path, segment_bytes=200)
    assert reopened.events == 20
    assert reopened.oldest_age_seconds() >= 0
    reopened.append([events(20, 4)])
    assert replay_all(reopened) == events(0, 24)
    reopened.close()
    assert not list(tmp_path.glob("*.seg"))  # nothing left behind once replayed


def test_age_of_the_oldest_event_and_depth(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    assert spool.oldest_age_seconds() == 0.0 and spool.bytes == 0
    spool.append([events(0, 5)])
    assert spool.bytes == len(encode_record(events(0, 5), 0))
    later = os.path.getmtime(max(tmp_path.glob("*.seg"))) + 60
    assert 59 <= spool.oldest_age_seconds(now=later) <= 61


def test_files_that_are_not_segments_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.seg").write_bytes(b"not ours")
    spool = opened(tmp_path)
    assert spool.empty
    spool.close()
    assert (tmp_path / "notes.seg").exists()


def test_a_failed_write_leaves_no_cut_record_in_front_of_later_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spool = opened(tmp_path)
    spool.append([events(0, 2)])
    real_write = os.write
    calls = 0

    def disk_full(descriptor: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(descriptor, bytes(data)[:7])  # a short write, then no space
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError):
        spool.append([events(2, 2)])
    monkeypatch.setattr(os, "write", real_write)
    assert spool.append([events(4, 2)]) == 1
    spool.close()

    assert replay_all(opened(tmp_path)) == events(0, 2) + events(4, 2)


def test_a_second_spool_on_the_same_directory_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    first = opened(tmp_path)
    with pytest.raises(RuntimeError, match="in use by another process"):
        opened(tmp_path)
    first.close()
    opened(tmp_path).close()
