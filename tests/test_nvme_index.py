"""The NVMe index: its live table (compiled and Python), log and snapshot files,
compaction in the background, and recovery from damaged files."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvactors.errors import ConfigError, IndexDamagedError
from kvactors.keys import Key
from kvactors.media import index_format, index_snapshot, index_table, nvme_index
from kvactors.media.index_snapshot import SnapshotLoad
from kvactors.media.index_table import new_table
from kvactors.media.nvme_index import MIN_LOG_RECORDS, NVMeIndex

BB = 4096


@pytest.fixture(params=["python", "native"])
def native(request: pytest.FixtureRequest) -> bool:
    if request.param == "native" and index_table.NativeTable is None:
        pytest.skip("compiled NVMe index not built")
    return request.param == "native"


def state(index: NVMeIndex) -> list[tuple[Key, int, int]]:
    return [(e.key, e.slot, e.crc) for e in index.entries()]


KEYS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.binary(max_size=40),  # past the 32 inline bytes too
)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["put", "del"]), KEYS, st.integers(0, 9), st.integers(0, 2**32 - 1)
        ),
        max_size=60,
    )
)
def test_tables_agree_with_a_model(ops: list[tuple[str, Key, int, int]]) -> None:
    """Both tables (and a plain dict model) hold the same entries after any
    sequence of puts and deletes, in the same oldest-first order."""
    tables = [new_table(10, native=False)]
    if index_table.NativeTable is not None:
        tables.append(new_table(10, native=True))
        # Buckets recording distances up to 1 only: deletions read the records.
        tables.append(index_table.NativeTable(10, 3, 1))
    model: dict[Key, tuple[int, int, int]] = {}
    for seq, (op, key, slot, crc) in enumerate(ops, 1):
        if op == "put":
            for other in [k for k, v in model.items() if v[0] == slot]:
                del model[other]
            model[key] = (slot, crc, seq)
        else:
            model.pop(key, None)
        for table in tables:
            if op == "put":
                table.put(key, slot, crc, seq)
            else:
                table.delete(key, seq)
    want = [(k, v[0], v[1]) for k, v in sorted(model.items(), key=lambda kv: kv[1][2])]
    for table in tables:
        assert table.entries() == want
        assert len(table) == len(model)
        for key, (slot, crc, _) in model.items():
            assert table.find(key) == slot
            assert table.get(slot) == (key, crc)


def test_older_updates_lose_to_newer_ones(native: bool) -> None:
    """Sequence numbers decide, whatever order records are applied in (a snapshot
    taken while stores went on, then the log replayed over it)."""
    table = new_table(4, native)
    table.put(b"new", 1, 7, 10)
    table.put(b"old", 1, 5, 3)  # the slot was reused later: ignored
    table.put(b"new", 2, 5, 4)  # the key was written again later: ignored
    table.delete(b"new", 9)  # older than the put: ignored
    assert table.entries() == [(b"new", 1, 7)]
    table.delete(b"new", 11)
    assert table.entries() == []


def test_dump_and_apply_round_trip(native: bool) -> None:
    src = new_table(100, native)
    keys: list[Key] = [i * 7 for i in range(50)] + [bytes([i]) * (i % 45 + 1) for i in range(50)]
    for i, key in enumerate(keys):
        src.put(key, i, i * 3, i + 1)
    data, n = src.dump(0, 100)
    assert n == 100
    for other in (True, False) if index_table.NativeTable is not None else (False,):
        dst = new_table(100, other)  # the file format is the same for both tables
        assert dst.apply(data, 0) == (100, len(data), 1)
        assert dst.entries() == src.entries()
        # A record cut short stops the replay where it starts.
        dst = new_table(100, other)
        applied, _, ok = dst.apply(data[:-3], 0)
        assert (applied, ok) == (99, 2)  # the buffer ends inside record 100
        assert len(dst) == 99


def test_torn_tail_is_cut_and_new_records_follow_good_ones(tmp_path: Path, native: bool) -> None:
    index = NVMeIndex(tmp_path, BB, 16, native=native)
    index.put([(1, 0, 11), (b"k", 1, 22)])
    index.close()
    with open(tmp_path / "index.1.log", "ab") as fh:
        fh.write(b"\x20\x00\x00\x00garbage")
    index = NVMeIndex(tmp_path, BB, 16, native=native)
    assert index.torn_tail
    assert state(index) == [(1, 0, 11), (b"k", 1, 22)]
    index.put([(2, 2, 33)])
    index.close()
    again = NVMeIndex(tmp_path, BB, 16, native=native)
    assert not again.torn_tail
    assert [k for k, _, _ in state(again)] == [1, b"k", 2]
    again.close()


@pytest.mark.parametrize("batch", [1, 64])
def test_log_stays_bounded_by_live_entries_counting_records(
    tmp_path: Path, native: bool, batch: int
) -> None:
    """1,000 live entries rewritten in appends of 1 or 64 records: the logs never
    hold more than max(MIN_LOG_RECORDS, live) records plus what was appended
    while a compaction ran, and reopening replays only that tail."""
    index = NVMeIndex(tmp_path, BB, 1000, sync=False, native=native)
    worst = 0
    for round_ in range(20):
        for lo in range(0, 1000, batch):
            slots = range(lo, min(lo + batch, 1000))
            index.put([(round_ * 1000 + s, s, s) for s in slots], sync=False)
            worst = max(worst, index.log_records)
    index.close()
    assert worst <= 2 * max(MIN_LOG_RECORDS, 1000) + 64  # at all times
    assert index.compactions >= 5
    again = NVMeIndex(tmp_path, BB, 1000, native=native)
    # what a compaction still running at the last put left in the new log is
    # replayed too (close waits for it; on a loaded host it can lag behind)
    assert again.log_records <= 2 * max(MIN_LOG_RECORDS, 1000) + 64
    assert sorted(k for k, _, _ in state(again)) == list(range(19000, 20000))
    again.close()


def test_log_bound_holds_while_a_finished_compaction_retires_its_logs(
    tmp_path: Path, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction that has written its snapshot but is still deleting the old
    logs (slow on a loaded disk) must not let appends run past the bound: the
    store that finds the logs over it starts the next compaction and waits."""
    real_unlink = Path.unlink

    def slow_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name.endswith(".log"):
            time.sleep(0.05)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", slow_unlink)
    index = NVMeIndex(tmp_path, BB, 1000, sync=False, native=native)
    worst = 0
    for round_ in range(12):
        for lo in range(0, 1000, 64):
            slots = range(lo, min(lo + 64, 1000))
            index.put([(round_ * 1000 + s, s, s) for s in slots], sync=False)
            worst = max(worst, index.log_records)
    index.close()
    assert worst <= 2 * max(MIN_LOG_RECORDS, 1000) + 64
    again = NVMeIndex(tmp_path, BB, 1000, native=native)
    assert sorted(k for k, _, _ in state(again)) == list(range(11000, 12000))
    again.close()


def test_stores_go_on_while_a_snapshot_is_written(
    tmp_path: Path, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background compaction copies the table a chunk at a time: puts from
    another thread keep landing, and after a reopen every put is there."""
    monkeypatch.setattr(index_snapshot, "CHUNK_SLOTS", 512)
    n = 16 * index_snapshot.CHUNK_SLOTS
    index = NVMeIndex(tmp_path, BB, n, sync=False, native=native)
    index.put([(i, i, i) for i in range(n)], sync=False)
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 20_000:
            index.put([(10**9 + i, i % n, 1)], sync=False)
            written.append(i)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.01)
    index.compact()
    stop.set()
    thread.join()
    index.close()
    want = {}
    for i in range(n):
        want[i] = i
    for i in written:
        want[i % n] = 10**9 + i
    again = NVMeIndex(tmp_path, BB, n, native=native)
    assert {e.slot: e.key for e in again.entries()} == want
    again.close()


def test_a_crash_at_any_point_of_compaction_keeps_the_state(tmp_path: Path, native: bool) -> None:
    """The files a compaction leaves at each step (rotated log only; snapshot
    written but not renamed; renamed but old logs not deleted) all reopen to
    the same entries."""
    index = NVMeIndex(tmp_path, BB, 64, native=native)
    index.put([(i, i, i) for i in range(40)])
    index.delete([3, 4])
    index.close()
    want = state(NVMeIndex(tmp_path, BB, 64, native=native))
    # Rotated to a new log, snapshot not written yet.
    index = NVMeIndex(tmp_path, BB, 64, native=native)
    with index.lock:
        index._start_compaction(background=False)
    index._compactor = None
    index.put([(100, 5, 9)])
    index.close()
    want = [w for w in want if w[1] != 5] + [(100, 5, 9)]
    assert state(NVMeIndex(tmp_path, BB, 64, native=native)) == want
    # Snapshot written, old logs still there (the unlink step never ran).
    index = NVMeIndex(tmp_path, BB, 64, native=native)
    logs = {p.name: p.read_bytes() for p in tmp_path.glob("index.*.log")}
    index.compact()
    index.close()
    for name, data in logs.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "index.snap.tmp").write_bytes(b"half a snapshot")
    again = NVMeIndex(tmp_path, BB, 64, native=native)
    assert state(again) == want
    assert not (tmp_path / "index.snap.tmp").exists()
    again.close()


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("damage", ["garbage", "empty", "half", "directory"])
def test_a_damaged_snapshot_is_set_aside_and_what_verifies_is_kept(
    tmp_path: Path, native: bool, damage: str, mapped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record snapshot (Python table) keeps each record that verifies; the
    table snapshot (compiled) each chunk of 128 slots that verifies."""
    load: SnapshotLoad = "direct"
    if mapped:  # files read in small pieces, records split across them
        monkeypatch.setattr(index_snapshot, "READ_BYTES", 100)
        load = "read"
    n = 4096 if native else 64  # 32 chunks of the compiled table
    step = n // 32
    index = NVMeIndex(tmp_path, BB, n, native=native)
    index.put([(i, i * step, i) for i in range(20)])
    index.compact()
    index.put([(100, 30 * step, 1)])  # in the log after the snapshot
    index.close()
    snap = tmp_path / "index.snap"
    data = snap.read_bytes()
    if damage == "garbage":
        snap.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        snap.write_bytes(b"")
    elif damage == "half":
        snap.write_bytes(data[: len(data) // 2])
    else:
        snap.unlink()
        snap.mkdir()
        with pytest.raises(IndexDamagedError, match=r"index\.snap is a directory"):
            NVMeIndex(tmp_path, BB, n, native=native)
        return
    again = NVMeIndex(tmp_path, BB, n, native=native, snapshot_load=load)
    got = state(again)
    assert again.quarantined == [tmp_path / "index.snap.damaged"]
    # Whatever is kept is exactly what was written; the log after the snapshot too.
    assert (100, 30 * step, 1) in got
    assert set(got) <= {(i, i * step, i) for i in range(20)} | {(100, 30 * step, 1)}
    if damage == "half":
        assert len(got) >= 5  # the records (chunks) before the cut verified
    again.put([(200, 31 * step, 2)])
    again.close()
    # The state after recovery is durable on its own: reopening needs nothing set aside.
    third = NVMeIndex(tmp_path, BB, n, native=native, snapshot_load=load)
    assert third.quarantined == []
    assert state(third) == [*got, (200, 31 * step, 2)]
    third.close()


def _native_only() -> None:
    if index_table.NativeTable is None:
        pytest.skip("compiled NVMe index not built")


def _fill(index: NVMeIndex, n: int, rng: random.Random) -> dict[Key, tuple[int, int]]:
    """Keys of every kind (long ones out of line too) over random slots."""
    model: dict[Key, tuple[int, int]] = {}
    for i in range(n):
        kind = rng.random()
        key: Key = (
            rng.randbytes(rng.choice([0, 8, 32, 33, 70]))
            if kind < 0.5
            else rng.randrange(-(2**70), 2**70)
            if kind < 0.6
            else i
        )
        slot = rng.randrange(index.num_blocks)
        for other in [k for k, v in model.items() if v[0] == slot]:
            del model[other]
        model[key] = (slot, i)
        index.put([(key, slot, i)], sync=False)
    return model


@pytest.mark.parametrize("dist_cap", [1, 2, 0])
def test_the_compiled_hash_agrees_with_a_dict_under_churn(dist_cap: int) -> None:
    """A nearly full compiled table (3/4 of its buckets used) under random puts
    over used slots and deletes, its buckets recording distances from home up to
    1, 2 or as many as their bits hold (past that, deletions read the record):
    every key is found at its slot, no other."""
    _native_only()
    rng = random.Random(dist_cap)
    n = 3000
    table = index_table.NativeTable(n, 11, dist_cap)
    model: dict[Key, int] = {}
    by_slot: dict[int, Key] = {}
    for seq in range(1, 30_000):
        if rng.random() < 0.85 or not model:
            key: Key = rng.randrange(4 * n)
            slot = rng.randrange(n)
            table.put(key, slot, 0, seq)
            if key in model:
                del by_slot[model.pop(key)]
            if slot in by_slot:
                del model[by_slot.pop(slot)]
            model[key], by_slot[slot] = slot, key
        else:
            key = rng.choice(list(model))
            assert table.delete(key, seq)
            del by_slot[model.pop(key)]
    assert len(table) == len(model)
    for key in range(4 * n):
        assert table.find(key) == model.get(key, -1)


@pytest.mark.parametrize("load", ["read", "direct", "mmap"])
def test_a_table_snapshot_reopens_to_the_same_table(tmp_path: Path, load: SnapshotLoad) -> None:
    """The compiled table's snapshot is its own arrays: after a reopen (each way of
    reading it) every entry is found by key and slot, new entries go in and old
    ones out through the loaded hash, and the hash seed came with it."""
    _native_only()
    rng = random.Random(7)
    index = NVMeIndex(tmp_path, BB, 3000, sync=False)
    model = _fill(index, 4000, rng)
    index.compact()
    seed = index.table.seed  # type: ignore[attr-defined]
    index.close()
    again = NVMeIndex(tmp_path, BB, 3000, sync=False, snapshot_load=load)
    assert again.snapshot_format == index_format.TABLE_VERSION
    assert again.table.seed == seed  # type: ignore[attr-defined]
    assert again.log_records == 0
    assert {e.key: (e.slot, e.crc) for e in again.entries()} == model
    for key, (slot, crc) in model.items():
        assert again.by_key[key] == nvme_index.Entry(key, slot, crc)
    model.update(_fill(again, 2000, rng))  # reuses slots: removals from the loaded hash
    got = {e.key: (e.slot, e.crc) for e in again.entries()}
    slots = {v[0] for v in got.values()}
    assert len(slots) == len(got)
    again.close()
    third = NVMeIndex(tmp_path, BB, 3000, sync=False)
    assert {e.key: (e.slot, e.crc) for e in third.entries()} == got
    third.close()


def test_a_table_snapshot_is_the_table_at_its_rotation(tmp_path: Path) -> None:
    """Stores that change the table while its snapshot is written (chunks written
    before they change) leave the snapshot as the table was at the rotation: the
    snapshot alone (the later log removed) reopens to exactly that state."""
    _native_only()
    n = 8 * 1024
    index = NVMeIndex(tmp_path, BB, n, sync=False)
    # Every third key is long (held out of line, freed when its slot is reused).
    keys: list[Key] = [b"K" * 40 + i.to_bytes(4, "little") if i % 3 == 0 else i for i in range(n)]
    index.put([(key, i, i) for i, key in enumerate(keys)], sync=False)
    index.wait_compaction()
    with index.lock:
        index._start_compaction(background=False)
        gen = index.gen
    want = sorted(state(index), key=repr)
    for i in range(3000):  # every chunk changed (and moved keys) before it is written
        index.put([(i, (i * 7919) % n, 5), (10**6 + i, (i * 104729) % n, 6)], sync=False)
    index.delete(list(range(5000, 5100)))
    index._write_snapshot()
    final = sorted(state(index), key=repr)
    index.close()
    log = index._log_path(gen)
    saved = log.read_bytes()
    log.unlink()
    alone = NVMeIndex(tmp_path, BB, n, sync=False)
    assert sorted(state(alone), key=repr) == want
    alone.close()
    for stale in tmp_path.glob("index.*.log"):
        stale.unlink()
    log.write_bytes(saved)
    again = NVMeIndex(tmp_path, BB, n, sync=False)
    assert sorted(state(again), key=repr) == final
    again.close()


def test_a_table_snapshot_copied_while_stores_run_is_the_table_at_its_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background copy saves chunks with neither the lock nor the GIL while a
    store thread changes the table; a store that reaches a chunk first saves it
    itself, one that reaches a chunk in the middle of its copy takes it over
    (the copy, made a pause in the middle of each chunk here, is dropped). The
    snapshot alone reopens to the table as it was at the rotation, the snapshot
    and the log to the table as it was at the end."""
    _native_only()
    monkeypatch.setattr(nvme_index, "COMPACT_DIVISOR", 1)
    # No compaction of its own, however many rounds the writer's records add up over.
    monkeypatch.setattr(nvme_index, "MIN_LOG_RECORDS", 1 << 40)
    monkeypatch.setattr(index_snapshot, "SNAP_COPY_HOLD_US", 100)
    n = 1 << 16
    index = NVMeIndex(tmp_path, BB, n, sync=False)
    # Some long keys (out of line): their chunks are saved under the lock.
    index.put(
        [(b"L" * 40 + i.to_bytes(4, "little") if i % 997 == 0 else i, i, i) for i in range(n)],
        sync=False,
    )
    index.compact()  # the log empty: the writer's records stay below the bound
    stop = threading.Event()
    rng = random.Random(3)

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 500:  # fewer records than the compaction bound
            base = 10**7 + 64 * i
            # Slots of the lower half only: the upper half's record chunks are left
            # to the copy, so it saves some however fast this thread runs.
            index.put([(base + j, rng.randrange(n // 2), 3) for j in range(64)], sync=False)
            i += 1

    taken_over = False
    for _ in range(60):  # a take-over needs a store to meet a chunk mid-copy: a race
        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.002)
        with index.lock:  # the writer waits here, so it runs while the copy runs
            index._start_compaction(background=False)
            gen = index.gen
            want = sorted(index.table.entries(), key=repr)
        index._write_snapshot()
        stop.set()
        thread.join()
        stop.clear()
        by_updates, by_copy, taken = index.table.snap_counts  # type: ignore[attr-defined]
        final = sorted(index.table.entries(), key=repr)
        index.close()
        log = index._log_path(gen)
        saved = log.read_bytes()
        log.unlink()
        alone = NVMeIndex(tmp_path, BB, n, sync=False)
        assert sorted(alone.table.entries(), key=repr) == want
        alone.close()
        for stale in tmp_path.glob("index.*.log"):
            stale.unlink()
        log.write_bytes(saved)
        index = NVMeIndex(tmp_path, BB, n, sync=False)
        assert sorted(index.table.entries(), key=repr) == final
        assert by_copy > 0
        assert by_updates + by_copy == index.table.layout["chunks"]  # each saved once
        if taken > 0 and by_updates > taken:
            taken_over = True
            break
    index.close()
    assert taken_over, "no store took a chunk over from the background copy"


@pytest.mark.parametrize("where", ["header", "crcs", "records", "buckets", "long keys"])
def test_a_torn_table_snapshot_is_detected(tmp_path: Path, where: str) -> None:
    """A flipped byte anywhere in a table snapshot is found: the header or the CRC
    list (nothing can be checked: the logs are replayed alone), a chunk of records
    (its entries dropped), the buckets (the hash rebuilt from the records), a long
    key (its entry dropped); the file is set aside, nothing wrong is served, and
    the reopened state is durable on its own."""
    _native_only()
    n = 4096
    index = NVMeIndex(tmp_path, BB, n, sync=False)
    model = {i: (i, i) for i in range(0, n, 3)}
    index.put([(k, s, c) for k, (s, c) in model.items()], sync=False)
    long_key = b"L" * 50
    index.put([(long_key, 1, 77)], sync=False)
    model[long_key] = (1, 77)
    index.compact()
    index.put([(b"after", 2, 9)], sync=False)
    model[b"after"] = (2, 9)
    index.close()
    snap = tmp_path / "index.snap"
    data = bytearray(snap.read_bytes())
    layout = index._table_layout()
    at = {
        "header": 40,
        "crcs": layout["crcs_off"] + 4,
        "records": layout["recs_off"] + 2048 * 48 + 100,
        "buckets": layout["ht_off"] + 8,
        "long keys": layout["long_off"] + 20,
    }[where]
    data[at] ^= 0xFF
    snap.write_bytes(bytes(data))
    again = NVMeIndex(tmp_path, BB, n, sync=False)
    assert again.quarantined == [tmp_path / "index.snap.damaged"]
    got = {e.key: (e.slot, e.crc) for e in again.entries()}
    assert got.items() <= model.items()  # nothing wrong
    assert got[b"after"] == (2, 9)  # the log after it is replayed
    if where == "buckets":
        assert got == model  # every record verified
    if where == "records":
        assert len(got) == len(model) - len(range(2049, 2048 + 128, 3))  # one chunk of slots
    if where == "long keys":
        assert long_key not in got
        assert len(got) == len(model) - 1
    for key, (slot, _) in got.items():
        assert again.by_key[key].slot == slot
    again.close()
    third = NVMeIndex(tmp_path, BB, n, sync=False)
    assert third.quarantined == []
    assert {e.key: (e.slot, e.crc) for e in third.entries()} == got
    third.close()


def test_record_snapshots_stay_readable_and_table_snapshots_name_their_format(
    tmp_path: Path,
) -> None:
    """A directory written with the record snapshot (format 2, the Python table and
    earlier versions) reopens with the compiled table, whose next compaction writes
    a table snapshot; a table snapshot opened without the compiled index is a
    typed error naming the format (its logs before it are gone)."""
    _native_only()
    old = NVMeIndex(tmp_path, BB, 100, native=False)
    old.put([(i, i, i) for i in range(50)])
    old.compact()
    old.put([(b"x", 60, 1)])
    old.close()
    assert (tmp_path / "index.snap").read_bytes()[:8] == index_format.SNAP_MAGIC
    index = NVMeIndex(tmp_path, BB, 100)
    assert index.snapshot_format == index_format.VERSION
    want = state(index)
    assert len(want) == 51
    index.compact()
    index.close()
    assert (tmp_path / "index.snap").read_bytes()[:8] == index_format.TSNAP_MAGIC
    again = NVMeIndex(tmp_path, BB, 100)
    assert again.snapshot_format == index_format.TABLE_VERSION
    assert state(again) == want
    again.close()
    with pytest.raises(IndexDamagedError, match=r"table snapshot \(format 3"):
        NVMeIndex(tmp_path, BB, 100, native=False)


def test_a_table_snapshot_of_another_layout_or_geometry_is_refused(tmp_path: Path) -> None:
    """A table snapshot whose header verifies but describes other arrays (another
    build's layout) or another geometry (a file from elsewhere): IndexDamagedError
    naming the file, never loaded."""
    _native_only()
    index = NVMeIndex(tmp_path, BB, 100)
    index.put([(1, 1, 1)])
    index.compact()
    index.close()
    snap = tmp_path / "index.snap"
    data = snap.read_bytes()
    fields = list(index_format.TABLE_HEAD.unpack_from(data))

    def rewrite(i: int, value: int) -> None:
        patched = list(fields)
        patched[i] = value
        head = index_format.TABLE_HEAD.pack(*patched)[:-4]
        head += zlib.crc32(head).to_bytes(4, "little")
        snap.write_bytes(head + data[len(head) :])

    rewrite(10, 64)  # rec_bytes
    with pytest.raises(IndexDamagedError, match="another layout"):
        NVMeIndex(tmp_path, BB, 100)
    rewrite(5, 99)  # num_blocks
    with pytest.raises(IndexDamagedError, match="describes 4096 x 99"):
        NVMeIndex(tmp_path, BB, 100)
    rewrite(1, 4)  # version
    with pytest.raises(IndexDamagedError, match="version 4"):
        NVMeIndex(tmp_path, BB, 100)


def test_a_garbage_log_is_set_aside(tmp_path: Path, native: bool) -> None:
    index = NVMeIndex(tmp_path, BB, 16, native=native)
    index.put([(1, 1, 1)])
    index.compact()
    index.put([(2, 2, 2)])
    index.close()
    (log,) = tmp_path.glob("index.*.log")
    log.write_bytes(os.urandom(200))
    again = NVMeIndex(tmp_path, BB, 16, native=native)
    assert state(again) == [(1, 1, 1)]  # the snapshot's entries; the log's are lost, not wrong
    assert again.quarantined == [log.with_name(log.name + ".damaged")]
    again.close()


def test_geometry_never_changes_silently(tmp_path: Path) -> None:
    index = NVMeIndex(tmp_path, BB, 16, 2)
    index.close()
    for bb, nb, stripes, field in [
        (2 * BB, 16, 2, "nvme.directory"),
        (BB, 8, 2, "nvme.directory"),
        (BB, 16, 1, r"nvme\.stripes = 1"),
    ]:
        with pytest.raises(ConfigError, match=field):
            NVMeIndex(tmp_path, bb, nb, stripes)
    # A damaged geometry record is refused naming the file, never rewritten.
    meta = tmp_path / "index.meta"
    meta.write_bytes(meta.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IndexDamagedError, match=r"index\.meta is damaged"):
        NVMeIndex(tmp_path, BB, 16, 2)
    meta.write_bytes(b"")
    with pytest.raises(IndexDamagedError, match=r"index\.meta is damaged"):
        NVMeIndex(tmp_path, 2 * BB, 16, 2)


def test_block_files_without_a_geometry_record_are_refused(tmp_path: Path) -> None:
    """A crash while the directory was made (or files from elsewhere): block
    files but no index.meta. Refused, naming the files, never reshaped."""
    (tmp_path / "blocks.0.bin").write_bytes(bytes(BB))
    with pytest.raises(IndexDamagedError, match=r"index\.meta is missing but blocks\.0\.bin"):
        NVMeIndex(tmp_path, BB, 16, 2, data_files=[tmp_path / "blocks.0.bin"])
    assert (tmp_path / "blocks.0.bin").stat().st_size == BB


def test_many_random_reopens_match_a_model(tmp_path: Path, native: bool) -> None:
    """Puts, deletes, compactions and reopens in random order: every reopen
    holds exactly the model's entries."""
    rng = random.Random(5)
    model: dict[int, tuple[int, int]] = {}
    index = NVMeIndex(tmp_path, BB, 32, sync=False, native=native)
    for _ in range(300):
        op = rng.random()
        if op < 0.6:
            key, slot = rng.randrange(100), rng.randrange(32)
            for other in [k for k, v in model.items() if v[0] == slot]:
                del model[other]
            model[key] = (slot, key * 3)
            index.put([(key, slot, key * 3)], sync=False)
        elif op < 0.8:
            key = rng.randrange(100)
            model.pop(key, None)
            index.delete([key])
        elif op < 0.9:
            index.compact()
        else:
            index.close()
            index = NVMeIndex(tmp_path, BB, 32, sync=False, native=native)
        assert sorted((e.key, e.slot, e.crc) for e in index.entries()) == sorted(
            (k, s, c) for k, (s, c) in model.items()
        )
    index.close()


_EDGE = index_format.MAX_KEY_BYTES
_KEYS = st.one_of(
    st.sampled_from([_EDGE - 1, _EDGE, _EDGE + 1]).map(lambda n: b"k" * n),
    st.binary(max_size=40),
    st.sampled_from([8 * _EDGE - 1, 8 * _EDGE]).flatmap(
        lambda bits: st.sampled_from([2**bits - 1, 2**bits, -(2**bits), -(2**bits) + 1])
    ),
    st.integers(min_value=-(2**70), max_value=2**70),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_KEYS, max_size=6))
def test_fitting_keeps_exactly_the_keys_a_record_holds(keys: list[Key]) -> None:
    """``fitting`` leaves out exactly the keys ``encode`` refuses, in order."""

    def encodes(key: Key) -> bool:
        try:
            index_format.encode(index_format.OP_PUT, [key], [0], [0], 1)
        except ValueError:
            return False
        return True

    assert index_format.fitting(keys) == [k for k in keys if encodes(k)]


def test_the_compiled_index_refuses_a_key_too_long_as_encode_does() -> None:
    """The compiled table and encoder refuse an ``int`` key whose signed bytes
    exceed ``MAX_KEY_BYTES`` as they refuse such a ``bytes`` key, with
    ``index_format.encode``'s ``ValueError``; finding or deleting one answers
    "absent", as the Python table does. The longest keys that fit are held."""
    if index_table.NativeTable is None:
        pytest.skip("compiled NVMe index not built")
    from kvactors._nvme_index import encode as native_encode

    edge = index_format.MAX_KEY_BYTES
    message = f"^keys of the NVMe index are at most {edge} bytes$"
    too_long: list[Key] = [
        b"k" * (edge + 1),
        2 ** (8 * edge - 1),
        -(2 ** (8 * edge - 1)),
        2**600_000,
    ]
    fits: list[Key] = [b"k" * edge, 2 ** (8 * edge - 1) - 1, -(2 ** (8 * edge - 1)) + 1]
    for key in too_long:
        with pytest.raises(ValueError, match=message):
            index_format.encode(index_format.OP_PUT, [key], [0], [0], 1)
        with pytest.raises(ValueError, match=message):
            native_encode(index_format.OP_PUT, [1, key], [0, 1], [0, 0], 1)
    tables = [new_table(4, native=True), new_table(4, native=False)]
    for table in tables:
        for seq, key in enumerate(fits, 1):
            table.put(key, seq, seq, seq)
    native_table = tables[0]
    for key in too_long:
        with pytest.raises(ValueError, match=message):
            native_table.put(key, 0, 0, 10)
    for table in tables:
        for key in too_long:
            assert table.find(key) == -1
            assert table.delete(key, 11) is False
        assert table.max_seq == 11
        assert table.entries() == [(key, i, i) for i, key in enumerate(fits, 1)]
        assert [table.find(key) for key in fits] == [1, 2, 3]


@pytest.mark.parametrize("stray", ["index.\u00b2.log", "index.01.log", "index.\u0663.log"])
def test_files_named_like_a_log_but_not_one_are_left_alone(
    tmp_path: Path, native: bool, stray: str
) -> None:
    # Only index.G.log with G in ASCII decimal (as the index names them) is a log:
    # a name with another digit used to fail the open with a bare ValueError.
    index = NVMeIndex(tmp_path, BB, 16, native=native)
    index.put([(1, 2, 3), (b"k", 4, 5)])
    index.close()
    want = state(NVMeIndex(tmp_path, BB, 16, native=native))
    (tmp_path / stray).write_bytes(b"not a log of this index")
    again = NVMeIndex(tmp_path, BB, 16, native=native)
    assert state(again) == want == [(1, 2, 3), (b"k", 4, 5)]
    assert again.quarantined == []
    again.put([(6, 7, 8)])
    again.close()
    assert (tmp_path / stray).read_bytes() == b"not a log of this index"
    assert state(NVMeIndex(tmp_path, BB, 16, native=native)) == [*want, (6, 7, 8)]


def test_a_failed_append_is_cut_back_and_indexes_nothing(
    tmp_path: Path, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/durability.md: a log append that fails (a full disk) is truncated to
    # where it was; later records never follow a torn one, the failed put's
    # entries are not indexed, before or after a reopen.
    index = NVMeIndex(tmp_path, BB, 16, native=native)
    index.put([(1, 2, 3)])
    log = tmp_path / f"index.{index.gen}.log"
    size = log.stat().st_size
    real = os.write
    calls = []

    def full_disk(fd: int, data: Any) -> int:
        if fd != index._log_fd:
            return real(fd, data)
        calls.append(len(data))
        if len(calls) == 1:  # part of the records land, then the disk is full
            return real(fd, memoryview(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space left") as got:
        index.put([(b"lost", 5, 6), (7, 8, 9)])
    monkeypatch.setattr(os, "write", real)
    assert got.value.errno == errno.ENOSPC
    assert len(calls) == 2
    assert log.stat().st_size == size
    assert state(index) == [(1, 2, 3)]
    index.put([(10, 11, 12)])  # space is back
    index.close()
    again = NVMeIndex(tmp_path, BB, 16, native=native)
    assert not again.torn_tail
    assert state(again) == [(1, 2, 3), (10, 11, 12)]
    again.close()
