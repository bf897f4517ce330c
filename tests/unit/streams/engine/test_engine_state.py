"""A worker's state (`streams.engine.state`): a batch's view through its own writes (`Staged`),
the in-memory store, and a store partition in RocksDB with its changelog checkpoint."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from streams.engine.state import MemoryStore, PartitionStore, Staged

# Staged

def test_staged_reads_its_own_writes_before_they_are_made() -> None:
    base = MemoryStore({b"a": b"1"})
    staged = Staged(base)
    staged.put(b"b", b"2")
    staged.put(b"a", b"3")
    assert (staged.get(b"a"), staged.get(b"b")) == (b"3", b"2")
    assert base.data == {b"a": b"1"}


def test_a_staged_delete_hides_the_stored_value() -> None:
    staged = Staged(MemoryStore({b"a": b"1", b"b": b"2"}))
    staged.put(b"a", None)
    assert staged.get(b"a") is None
    assert dict(staged.items()) == {b"b": b"2"}


def test_staged_items_list_every_key_once_with_its_latest_value() -> None:
    staged = Staged(MemoryStore({b"a": b"1", b"b": b"2"}))
    staged.put(b"b", b"20")
    staged.put(b"c", b"3")
    assert sorted(staged.items()) == [(b"a", b"1"), (b"b", b"20"), (b"c", b"3")]


def test_a_memory_store_applies_puts_and_deletes_at_once() -> None:
    store = MemoryStore({b"a": b"1", b"b": b"2"})
    store.write({b"a": None, b"c": b"3", b"gone": None})
    assert store.data == {b"b": b"2", b"c": b"3"}


_keys = st.sampled_from([b"a", b"b", b"c", b"d"])
_values = st.one_of(st.none(), st.binary(min_size=1, max_size=3))


@given(st.dictionaries(_keys, st.binary(min_size=1, max_size=3)), st.lists(st.tuples(_keys, _values)))
def test_staged_reads_like_the_store_with_its_writes_made(
        base: dict[bytes, bytes], writes: list[tuple[bytes, bytes | None]]) -> None:
    store = MemoryStore(base)
    staged = Staged(store)
    model = dict(base)
    for key, value in writes:
        staged.put(key, value)
        if value is None:
            model.pop(key, None)
        else:
            model[key] = value
    assert {key: staged.get(key) for key in (b"a", b"b", b"c", b"d")} == {
        key: model.get(key) for key in (b"a", b"b", b"c", b"d")}
    assert sorted(staged.items()) == sorted(model.items())
    assert store.data == base  # nothing made yet
    store.write(staged.writes)
    assert store.data == model


# PartitionStore

def test_a_partition_store_writes_reads_and_deletes_in_one_batch(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "state" / "touches-0")
    try:
        store.write({b"v-1": b"[1]", b"v-2": b"[2]"})
        store.write({b"v-1": None, b"v-3": b"[3]"})
        assert (store.get(b"v-1"), store.get(b"v-2"), store.get(b"missing")) == (None, b"[2]", None)
        assert isinstance(store.get(b"v-2"), bytes)
        assert sorted(store.items()) == [(b"v-2", b"[2]"), (b"v-3", b"[3]")]
    finally:
        store.close()


def test_a_partition_store_starts_with_checkpoint_zero(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "touches-0")
    try:
        assert store.checkpoint() == 0
        assert list(store.items()) == []
    finally:
        store.close()


def test_the_checkpoint_only_moves_forward(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "touches-0")
    try:
        store.write({b"k": b"1"}, 10)
        assert store.checkpoint() == 10
        store.write({b"k": b"2"}, 7)
        assert store.checkpoint() == 10
        assert store.get(b"k") == b"2"  # the data is written all the same
        store.write({}, 12)
        assert store.checkpoint() == 12
        store.write({b"k": b"3"})
        assert store.checkpoint() == 12
        assert (tmp_path / "touches-0.checkpoint").read_text() == "12"
    finally:
        store.close()


def test_an_unreadable_checkpoint_counts_as_zero(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "touches-0")
    try:
        (tmp_path / "touches-0.checkpoint").write_text("not a number")
        assert store.checkpoint() == 0
    finally:
        store.close()


def test_a_reopened_store_keeps_its_data_and_checkpoint(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "order-ledgers-3")
    store.write({b"o-1": b"{}"}, 5)
    store.close()
    reopened = PartitionStore(tmp_path / "order-ledgers-3")
    try:
        assert (reopened.get(b"o-1"), reopened.checkpoint()) == (b"{}", 5)
    finally:
        reopened.close()


def test_wipe_empties_the_store_and_forgets_its_checkpoint(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "code-redemptions-1")
    try:
        store.write({b"SALLY20": b"[]", b"OTHER": b"[]"}, 42)
        store.wipe()
        assert (list(store.items()), store.get(b"SALLY20"), store.checkpoint()) == ([], None, 0)
        assert not (tmp_path / "code-redemptions-1.checkpoint").exists()
        store.write({b"SALLY20": b"[1]"}, 3)  # still usable: the restore writes into it next
        assert (store.get(b"SALLY20"), store.checkpoint()) == (b"[1]", 3)
    finally:
        store.close()


def test_a_batch_staged_over_a_partition_store_reaches_disk_when_written(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "touches-0")
    try:
        store.write({b"a": b"1", b"b": b"2"}, 1)
        staged = Staged(store)
        staged.put(b"a", None)
        staged.put(b"c", b"3")
        assert sorted(staged.items()) == [(b"b", b"2"), (b"c", b"3")]
        assert store.get(b"a") == b"1"
        store.write(staged.writes, 2)
        assert (sorted(store.items()), store.checkpoint()) == ([(b"b", b"2"), (b"c", b"3")], 2)
    finally:
        store.close()
