"""The NVMe store's contract, run against each I/O backend (POSIX here; kvikio with GDS)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvactors.errors import ConfigError, TransferError
from kvactors.media import FileStore, kvikio_available, resolve_nvme_backend

BB = 8192

BACKENDS = [
    pytest.param("posix", id="posix"),
    pytest.param("kvikio", id="kvikio", marks=pytest.mark.gds),
]


def rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, BB), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_with_runs_and_gaps(tmp_path: Path, backend: str) -> None:
    store = FileStore("nvme", 32, BB, str(tmp_path), backend=backend)
    try:
        ids = [5, 6, 7, 0, 20, 21, 3]  # runs of adjacent slots and single ones
        keys: list[bytes | int] = [100, 101, 102, b"x", 104, 105, 106]
        data = rows(len(ids), 1)
        store.write_from(ids, data, keys)
        out = torch.empty_like(data)
        assert store.read_into(ids, out, keys) == []
        assert torch.equal(out, data)
        # Asking for the wrong key at a slot is a verification failure, not data.
        wrong = [*keys[:2], 999, *keys[3:]]
        assert store.read_into(ids, torch.empty_like(data), wrong) == [2]
    finally:
        store.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reopened_store_recovers_its_index(tmp_path: Path, backend: str) -> None:
    store = FileStore("nvme", 16, BB, str(tmp_path), backend=backend)
    store.write_from([3, 4], rows(2, 2), [1, 2])
    store.write_from([3], rows(1, 3), [7])  # slot 3 reused: key 1 is gone
    store.drop([2])
    store.close()
    again = FileStore("nvme", 16, BB, str(tmp_path), backend=backend)
    try:
        assert [(e.key, e.slot) for e in again.recovered()] == [(7, 3)]
        out = torch.empty(1, BB, dtype=torch.uint8)
        assert again.read_into([3], out, [7]) == []
        assert torch.equal(out, rows(1, 3))
    finally:
        again.close()


def test_a_fresh_store_starts_empty_whatever_the_directory_held(tmp_path: Path) -> None:
    store = FileStore("nvme", 16, BB, str(tmp_path), stripes=2)
    store.write_from([3, 4], rows(2, 2), [1, 2])
    store.close()
    (tmp_path / "notes.txt").write_text("kept")
    # another geometry (slots, stripes): refused as a reopening, taken when fresh
    with pytest.raises(ConfigError, match=r"nvme\.directory"):
        FileStore("nvme", 8, BB, str(tmp_path))
    again = FileStore("nvme", 8, BB, str(tmp_path), fresh=True)
    try:
        assert again.recovered() == []
        assert again.read_into([3], torch.empty(1, BB, dtype=torch.uint8), [1]) == [0]
        assert not list(tmp_path.glob("blocks.*.bin"))  # the old stripes' files are gone
        assert (tmp_path / "notes.txt").read_text() == "kept"
    finally:
        again.close()


def test_short_read_without_keys_is_a_transfer_error(tmp_path: Path) -> None:
    store = FileStore("nvme", 4, BB, str(tmp_path))
    try:
        store.preadv = lambda fd, bufs, off: 10
        with pytest.raises(TransferError, match="short read"):
            store.read_into([0], torch.empty(1, BB, dtype=torch.uint8))
    finally:
        store.close()


def test_temporary_directory_is_removed_on_close() -> None:
    store = FileStore("nvme", 4, BB)
    directory = store.directory
    assert directory.exists()
    store.close()
    assert not directory.exists()


def test_backend_resolution() -> None:
    assert resolve_nvme_backend("posix") == "posix"
    if kvikio_available():
        assert resolve_nvme_backend("kvikio") == "kvikio"
        assert resolve_nvme_backend("auto") == "kvikio"
    else:
        with pytest.raises(ConfigError, match=r"nvme\.backend"):
            resolve_nvme_backend("kvikio")
        assert resolve_nvme_backend("auto") == "posix"
