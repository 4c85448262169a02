"""Opening an NVMe directory: the lock, sizes checked first, typed errors that
leave nothing open, and damaged files."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvactors.errors import (
    CacheLockedError,
    ConfigError,
    IndexDamagedError,
    KVActorsError,
    StoreOpenError,
)
from kvactors.media import FileStore

BB = 4096

HOLDER = textwrap.dedent(
    """
    import sys
    from kvactors.media import FileStore
    store = FileStore("nvme", 16, 4096, sys.argv[1], stripes=2)
    print("open", flush=True)
    sys.stdin.readline()
    store.close()
    """
)


def test_deleting_files_does_not_release_the_lock(tmp_path: Path) -> None:
    """Another process holds the directory; every file in it is deleted (the old
    ``lock`` file trick): a second opener is still refused."""
    directory = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "open\n"
        for path in directory.iterdir():
            path.unlink()
        with pytest.raises(CacheLockedError, match="in use"):
            FileStore("nvme", 16, BB, str(directory), stripes=2)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0
    FileStore("nvme", 16, BB, str(directory), stripes=2).close()  # free once it exits


def temp_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("kvactors-*"))


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Temporary directories of the store land under ``tmp_path``."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_more_blocks_than_the_disk_holds_is_a_config_error(private_tmp: Path) -> None:
    """2**31 blocks of 4 KiB (8 TiB) on this disk: refused naming the field, the
    temporary directory removed, nothing left open: the next open works."""
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError, match=r"nvme\.num_blocks: 2147483648 blocks"):
        FileStore("nvme", 2**31, BB)
    assert temp_dirs(private_tmp) == []
    assert len(os.listdir("/proc/self/fd")) == fds
    FileStore("nvme", 16, BB).close()
    with pytest.raises(ConfigError, match=r"nvme\.num_blocks must be between"):
        FileStore("nvme", 2**32, BB)


def test_a_failed_open_of_a_named_directory_leaves_it_unlocked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nvme\.num_blocks"):
        FileStore("nvme", 2**40, BB, str(tmp_path))
    FileStore("nvme", 16, BB, str(tmp_path)).close()  # not locked, not damaged


def test_a_file_where_the_directory_should_be(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    path.write_text("not a directory")
    with pytest.raises(StoreOpenError, match=r"cache exists and is not a directory"):
        FileStore("nvme", 16, BB, str(path))
    with pytest.raises(StoreOpenError, match="Not a directory"):
        FileStore("nvme", 16, BB, str(path / "below"))


def test_a_directory_where_a_block_file_should_be(tmp_path: Path) -> None:
    (tmp_path / "blocks.1.bin").mkdir()
    with pytest.raises(IndexDamagedError, match=r"blocks\.1\.bin is a directory"):
        FileStore("nvme", 16, BB, str(tmp_path), stripes=2)
    (tmp_path / "blocks.1.bin").rmdir()
    FileStore("nvme", 16, BB, str(tmp_path), stripes=2).close()


@pytest.mark.parametrize("name", ["index.snap.tmp", "index.meta.tmp", "index.1.log.tmp"])
@pytest.mark.parametrize("used", [False, True])
def test_a_stale_index_tmp_is_removed_and_a_directory_of_that_name_refused(
    tmp_path: Path, name: str, used: bool
) -> None:
    # docs/durability.md: a stale index.*.tmp (a crash while writing it) is
    # removed at open; a directory in its place is IndexDamagedError naming it
    # (it used to be StoreOpenError "Is a directory" from the unlink).
    rows = torch.full((1, BB), 7, dtype=torch.uint8)
    if used:
        store = FileStore("nvme", 16, BB, str(tmp_path), stripes=2)
        store.write_from([3], rows, [42])
        store.close()
    (tmp_path / name).write_bytes(b"torn")
    store = FileStore("nvme", 16, BB, str(tmp_path), stripes=2)
    assert not (tmp_path / name).exists()
    assert [(e.key, e.slot) for e in store.recovered()] == ([(42, 3)] if used else [])
    store.close()
    (tmp_path / name).mkdir()
    (tmp_path / name / "inside").write_bytes(b"not ours")
    with pytest.raises(IndexDamagedError, match=rf"{name.replace('.', '[.]')} is a directory"):
        FileStore("nvme", 16, BB, str(tmp_path), stripes=2)
    assert (tmp_path / name / "inside").read_bytes() == b"not ours"  # nothing of it removed
    (tmp_path / name / "inside").unlink()
    (tmp_path / name).rmdir()
    store = FileStore("nvme", 16, BB, str(tmp_path), stripes=2)  # not locked, not damaged
    out = torch.empty_like(rows)
    assert store.read_into([3], out, [42]) == ([] if used else [0])
    if used:
        assert torch.equal(out, rows)
    store.close()


def test_permission_denied_is_a_startup_error(
    private_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EACCES from the file system (forced here: the tests may run as root)
    while creating the block files: a StoreOpenError naming the file, the
    temporary directory gone."""
    real = os.open

    def deny(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".bin"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(StoreOpenError, match=r"blocks\.bin: Permission denied") as info:
        FileStore("nvme", 16, BB)
    assert isinstance(info.value.__cause__, PermissionError)
    assert isinstance(info.value, KVActorsError)
    monkeypatch.setattr(os, "open", real)
    assert temp_dirs(private_tmp) == []


def test_too_many_open_files_is_a_startup_error(private_tmp: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 1, hard))
    try:
        with pytest.raises(StoreOpenError, match="Too many open files"):
            FileStore("nvme", 16, BB, stripes=4)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert temp_dirs(private_tmp) == []
    FileStore("nvme", 16, BB, stripes=4).close()


def test_a_block_file_longer_than_its_geometry_is_never_shrunk(tmp_path: Path) -> None:
    FileStore("nvme", 16, BB, str(tmp_path), stripes=2).close()
    path = tmp_path / "blocks.0.bin"
    os.truncate(path, 100 * BB)
    with pytest.raises(IndexDamagedError, match=r"blocks\.0\.bin holds 409600 bytes"):
        FileStore("nvme", 16, BB, str(tmp_path), stripes=2)
    assert path.stat().st_size == 100 * BB


def test_a_truncated_block_file_grows_back_and_its_blocks_are_misses(tmp_path: Path) -> None:
    store = FileStore("nvme", 8, BB, str(tmp_path))
    data = torch.randint(0, 256, (2, BB), dtype=torch.uint8)
    store.write_from([0, 7], data, [1, 2])
    store.close()
    os.truncate(tmp_path / "blocks.bin", BB)
    store = FileStore("nvme", 8, BB, str(tmp_path))
    try:
        assert (tmp_path / "blocks.bin").stat().st_size == 8 * BB
        out = torch.empty(2, BB, dtype=torch.uint8)
        assert store.read_into([0, 7], out, [1, 2]) == [1]
        assert torch.equal(out[0], data[0])
    finally:
        store.close()


def test_a_temporary_directory_skips_every_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/durability.md: a temporary directory (directory=None) skips every
    # fsync; index.meta's atomic write used to fsync the file and the directory.
    calls: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def counted(fd: int, name: str = name, real: Any = real) -> None:
            calls.append(name)
            real(fd)

        monkeypatch.setattr(os, name, counted)
    store = FileStore("nvme", 16, BB, None, durable=False, stripes=2)
    rows = torch.full((3, BB), 5, dtype=torch.uint8)
    store.write_from([0, 1, 2], rows, [1, 2, 3])
    store.index.compact()
    out = torch.empty_like(rows)
    assert store.read_into([0, 1, 2], out, [1, 2, 3]) == []
    assert torch.equal(out, rows)
    store.close()
    assert calls == []
    named = FileStore("nvme", 16, BB, str(tmp_path), stripes=2)  # durable: fsyncs
    try:
        assert "fsync" in calls
    finally:
        named.close()


def _fail_direct_opens(monkeypatch: pytest.MonkeyPatch, err: int) -> Callable[..., int]:
    """Make every ``os.open`` with ``O_DIRECT`` fail with ``err``; return the real one."""
    real = os.open

    def failing(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(err, os.strerror(err), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing)
    return real


@pytest.mark.parametrize("io", ["auto", "direct"])
def test_too_many_open_files_for_the_direct_descriptors_is_a_startup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, io: str
) -> None:
    # docs/durability.md: EMFILE while opening is StoreOpenError naming the path;
    # on the O_DIRECT descriptors it used to be ConfigError "nvme.io = 'direct'"
    # (also under nvme.io = "auto"). Only EINVAL is the file system refusing O_DIRECT.
    from kvactors.media import file_store

    if file_store._io_vectored is None:
        pytest.skip("compiled I/O core not built")
    real = _fail_direct_opens(monkeypatch, errno.EMFILE)
    with pytest.raises(StoreOpenError, match=r"blocks\.0\.bin: Too many open files"):
        FileStore("nvme", 16, BB, str(tmp_path), stripes=2, io=io)
    monkeypatch.setattr(os, "open", real)
    store = FileStore("nvme", 16, BB, str(tmp_path), stripes=2, io=io)  # nothing left locked
    try:
        assert store.io == "direct"
    finally:
        store.close()


def test_a_file_system_refusing_o_direct_is_buffered_or_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/api.md: EINVAL on the O_DIRECT open (a file system refusing it) is
    # ConfigError naming nvme.io under "direct", buffered I/O under "auto".
    from kvactors.media import file_store

    if file_store._io_vectored is None:
        pytest.skip("compiled I/O core not built")
    _fail_direct_opens(monkeypatch, errno.EINVAL)
    refused = r"nvme\.io = 'direct': .*blocks\.0\.bin cannot be opened with O_DIRECT"
    with pytest.raises(ConfigError, match=refused):
        FileStore("nvme", 16, BB, str(tmp_path), stripes=2, io="direct")
    store = FileStore("nvme", 16, BB, str(tmp_path), stripes=2, io="auto")
    try:
        assert store.io == "buffered"
        assert store.direct_fds == []
    finally:
        store.close()
