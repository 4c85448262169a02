"""docs/durability.md's promises held through the public API (``kvactors.open``
with a named NVMe directory): the files it lists and where a slot's bytes lie,
the index record's layout, the checks opening makes, and what a damaged file
becomes. (The store and index themselves are tested in test_durability.py,
test_file_store_open.py and test_nvme_index.py.)"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import kvactors
from _docs import DOCS
from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig
from kvactors.errors import (
    ActorStartError,
    ConfigError,
    IndexDamagedError,
    IntegrityError,
    KVActorsError,
    StoreOpenError,
)

pytestmark = pytest.mark.anyio

DURABILITY_MD = DOCS / "durability.md"
BB = 4096
RECORD = struct.Struct("<IBBHIIQ")  # crc32 | op | key kind | key length | slot | block crc | seq
LOG_HEADER = 32


def config(directory: Path | None, **nvme: Any) -> Config:
    block_bytes = nvme.pop("block_bytes", BB)
    nvme.setdefault("num_blocks", 16)
    return Config(
        block_bytes=block_bytes,
        gpu=GPUConfig(num_blocks=8, device="cpu"),
        cpu=TierConfig(num_blocks=8),
        nvme=NVMeConfig(directory=None if directory is None else str(directory), **nvme),
        write_mode="write_through",
    )


def blocks(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, BB), dtype=torch.uint8, generator=gen)


async def fill(directory: Path, keys: list[Any], **nvme: Any) -> torch.Tensor:
    data = blocks(len(keys))
    with anyio.fail_after(30):
        async with kvactors.open(config(directory, **nvme)) as kv:
            result = await kv.store(keys, data)
            assert result is not None
            assert sorted(map(repr, result.durable)) == sorted(map(repr, keys))
    return data


async def open_error(cfg: Config) -> KVActorsError:
    with anyio.fail_after(30):
        try:
            async with kvactors.open(cfg):
                pass
        except KVActorsError as exc:
            return exc
    raise AssertionError("opened")


def records(log: Path) -> list[tuple[tuple[int, ...], bytes, bytes]]:
    """(fields, key, the bytes the record's CRC covers) of each record of a log."""
    data = log.read_bytes()
    out = []
    offset = LOG_HEADER
    while offset < len(data):
        fields = RECORD.unpack_from(data, offset)
        klen = fields[3]
        total = RECORD.size + klen + (-(RECORD.size + klen) % 8)
        key = data[offset + RECORD.size : offset + RECORD.size + klen]
        out.append((fields, key, data[offset + 4 : offset + total]))
        offset += total
    assert offset == len(data)
    return out


@pytest.mark.parametrize("stripes", [1, 2, 3])
async def test_the_files_and_where_a_slots_bytes_lie(tmp_path: Path, stripes: int) -> None:
    """'What is on disk': blocks.K.bin per stripe (blocks.bin with one), index.meta,
    index.G.log; slot i in file i % stripes at offset (i // stripes) * block_bytes;
    each Put record names the slot and the CRC-32 of its bytes; a 32-byte key's
    record is 56 bytes."""
    keys: list[Any] = [bytes([i]) * 32 for i in range(5)]
    data = await fill(tmp_path, keys, stripes=stripes)
    names = sorted(os.listdir(tmp_path))
    files = ["blocks.bin"] if stripes == 1 else [f"blocks.{k}.bin" for k in range(stripes)]
    logs = [n for n in names if n.startswith("index.") and n.endswith(".log")]
    assert set(names) == {*files, "index.meta", *logs}
    assert len(logs) == 1
    found = records(tmp_path / logs[0])
    assert len(found) == len(keys)
    by_key = {key: (fields, body) for fields, key, body in found}
    assert set(by_key) == set(keys)
    for i, key in enumerate(keys):
        (crc, op, _kind, klen, slot, block_crc, _seq), body = by_key[key]
        assert crc == zlib.crc32(body)
        assert (op, klen, len(body) + 4) == (1, 32, 56)
        start = (slot // stripes) * BB
        raw = (tmp_path / files[slot % stripes]).read_bytes()[start : start + BB]
        assert raw == data[i].numpy().tobytes()
        assert block_crc == zlib.crc32(raw)
    sequences = [fields[6] for fields, _, _ in found]  # "orders every update"
    assert sequences == sorted(sequences)
    assert len(set(sequences)) == len(sequences)


async def test_default_stripes_are_two() -> None:
    assert NVMeConfig().stripes == 2


@pytest.mark.parametrize(
    ("change", "names"),
    [({"num_blocks": 32}, "nvme.directory"), ({"block_bytes": 2 * BB}, "nvme.directory"),
     ({"stripes": 3}, "nvme.stripes")],
)  # fmt: skip
async def test_another_geometry_is_a_config_error_naming_it(
    tmp_path: Path, change: dict[str, Any], names: str
) -> None:
    await fill(tmp_path, [1, 2])
    meta = (tmp_path / "index.meta").read_bytes()
    exc = await open_error(config(tmp_path, **change))
    assert type(exc) is ConfigError
    assert names in str(exc)
    assert (tmp_path / "index.meta").read_bytes() == meta  # never rewritten
    with anyio.fail_after(30):
        async with kvactors.open(config(tmp_path)) as kv:  # the original still opens
            assert (await kv.lookup([1, 2])).hits == 2


async def test_num_blocks_bounds_and_free_space_are_config_errors(tmp_path: Path) -> None:
    """'Opening a directory': nvme.num_blocks too large for the slot ids, or for
    the free space of the directory's file system: ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"nvme\.num_blocks"):
        Config.from_dict({"nvme": {"num_blocks": 2**32}})
    with pytest.raises(ConfigError, match=r"nvme\.num_blocks"):
        Config.from_dict({"nvme": {"num_blocks": 2**31}})
    huge = Config(
        block_bytes=16 << 20,
        gpu=GPUConfig(num_blocks=1, device="cpu"),
        cpu=TierConfig(num_blocks=1),
        nvme=NVMeConfig(num_blocks=2**22, directory=str(tmp_path / "kv")),  # 64 TiB
    )
    exc = await open_error(huge)
    assert type(exc) is ConfigError
    assert "nvme.num_blocks" in str(exc)
    assert not (tmp_path / "kv").exists() or os.listdir(tmp_path / "kv") == []


@pytest.mark.parametrize("damage", ["garbage", "empty", "missing", "a directory"])
async def test_a_damaged_geometry_record_is_index_damaged_naming_it(
    tmp_path: Path, damage: str
) -> None:
    await fill(tmp_path, [1])
    meta = tmp_path / "index.meta"
    if damage == "garbage":
        meta.write_bytes(os.urandom(40))
    elif damage == "empty":
        meta.write_bytes(b"")
    else:
        meta.unlink()
        if damage == "a directory":
            meta.mkdir()
    exc = await open_error(config(tmp_path))
    assert isinstance(exc, IndexDamagedError)
    assert isinstance(exc, StoreOpenError)
    assert isinstance(exc, ActorStartError)
    assert "index.meta" in str(exc)


@pytest.mark.parametrize("left", ["blocks.0.bin", "index.snap", "index.1.log"])
async def test_a_missing_geometry_record_names_the_index_file_that_is_there(
    tmp_path: Path, left: str
) -> None:
    """'Damaged files': index.meta missing while a block file or an index file
    exists is IndexDamagedError naming index.meta and that file (with only a
    log left, the message named index.snap, which was not there)."""
    await fill(tmp_path, [1])
    (tmp_path / "index.snap").write_bytes(b"")  # a file of each kind to choose from
    for path in tmp_path.iterdir():
        if path.name != left:
            path.unlink()
    exc = await open_error(config(tmp_path))
    assert isinstance(exc, IndexDamagedError)
    assert f"index.meta is missing but {left} exists" in str(exc)
    assert sorted(os.listdir(tmp_path)) == [left]  # nothing written


async def test_a_name_that_is_not_a_log_does_not_stop_a_fresh_directory(tmp_path: Path) -> None:
    """'What is on disk': index.01.log is not a log (never read, left alone), so a
    directory holding only it opens as a new one, not as one missing index.meta."""
    (tmp_path / "index.01.log").write_bytes(b"not the index's")
    with anyio.fail_after(30):
        async with kvactors.open(config(tmp_path)) as kv:
            assert (await kv.lookup([1])).hits == 0
            assert await kv.store([1], blocks(1)) is not None
    assert (tmp_path / "index.meta").exists()
    assert (tmp_path / "index.01.log").read_bytes() == b"not the index's"


FIFO_OPEN = """
import sys
from kvactors.media import FileStore
try:
    FileStore("nvme", 16, 4096, sys.argv[1], stripes=2).close()
except Exception as exc:
    print(type(exc).__name__, exc)
else:
    print("opened")
"""


@pytest.mark.parametrize("name", ["index.meta", "index.snap", "index.1.log", "blocks.0.bin"])
async def test_a_fifo_where_a_file_should_be_is_index_damaged_not_a_hang(
    tmp_path: Path, name: str
) -> None:
    """'Damaged files': anything but a regular file where an index or block file
    should be is IndexDamagedError naming it; a FIFO's open waited for a writer
    forever (the open runs in a child process, so that wait fails this test
    instead of hanging it)."""
    import sys

    await fill(tmp_path, [1])
    (tmp_path / "index.snap").write_bytes(b"")  # so that each name is there
    path = tmp_path / name
    path.unlink()
    os.mkfifo(path)
    with anyio.fail_after(30):  # the child is killed if its open waits
        done = await anyio.run_process([sys.executable, "-c", FIFO_OPEN, str(tmp_path)])
    stdout = done.stdout.decode()
    kind = "a block file" if name.startswith("blocks") else "an index file"
    assert stdout == f"IndexDamagedError {path} is not a regular file, not {kind}; move it away\n"
    assert path.exists()  # left as it was


async def test_a_longer_block_file_is_index_damaged(tmp_path: Path) -> None:
    await fill(tmp_path, [1])
    path = tmp_path / "blocks.0.bin"
    os.truncate(path, path.stat().st_size + 17 * BB)
    exc = await open_error(config(tmp_path))
    assert isinstance(exc, IndexDamagedError)
    assert "blocks.0.bin" in str(exc)


async def test_a_garbage_snapshot_is_set_aside_and_the_logs_replayed(tmp_path: Path) -> None:
    """'Damaged files': index.snap garbage -> renamed index.snap.damaged, every log
    replayed over what was kept, a fresh snapshot written; nothing wrong served."""
    data = await fill(tmp_path, [1, 2, 3])
    (tmp_path / "index.snap").write_bytes(os.urandom(5000))
    with anyio.fail_after(30):
        async with kvactors.open(config(tmp_path)) as kv:
            assert (await kv.lookup([1, 2, 3])).hits == 3
            out = torch.zeros(3, BB, dtype=torch.uint8)
            await kv.load([1, 2, 3], out)
            assert torch.equal(out, data)
    names = os.listdir(tmp_path)
    assert "index.snap.damaged" in names
    assert "index.snap" in names
    assert (tmp_path / "index.snap").read_bytes() != (tmp_path / "index.snap.damaged").read_bytes()


async def test_a_log_with_a_garbage_header_is_set_aside_and_its_blocks_are_misses(
    tmp_path: Path,
) -> None:
    await fill(tmp_path, [1, 2])
    (log,) = [p for p in tmp_path.iterdir() if p.name.endswith(".log")]
    data = bytearray(log.read_bytes())
    data[:8] = b"XXXXXXXX"
    log.write_bytes(bytes(data))
    with anyio.fail_after(30):
        async with kvactors.open(config(tmp_path)) as kv:
            assert (await kv.lookup([1, 2])).hits == 0
            assert await kv.store([1, 2], blocks(2)) is not None  # the tier works on
    assert (tmp_path / (log.name + ".damaged")).exists()


async def test_a_temporary_directory_is_removed_on_close() -> None:
    with anyio.fail_after(30):
        async with kvactors.open(config(None)) as kv:
            directory = Path(kv.medium("nvme").directory)  # type: ignore[attr-defined]
            assert directory.is_dir()
            result = await kv.store([1], blocks(1))
            assert result is not None
            assert result.durable == []  # never durable
    assert not directory.exists()


async def test_a_temporary_directory_is_removed_when_opening_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/durability.md: temporary directories are removed on close (and when
    opening fails)."""
    import tempfile

    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args: Any, **kwargs: Any) -> str:
        path = real_mkdtemp(*args, **{**kwargs, "dir": str(tmp_path)})
        made.append(path)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    bad = kvactors.Config(
        block_bytes=1000,  # O_DIRECT needs 4096-byte multiples
        gpu=kvactors.GPUConfig(num_blocks=4, device="cpu"),
        cpu=kvactors.TierConfig(num_blocks=4),
        nvme=kvactors.NVMeConfig(num_blocks=8, io="direct"),
    )
    with anyio.fail_after(30):
        with pytest.raises(ConfigError, match=r"nvme\.io"):
            async with kvactors.open(bad):
                pass
    assert made, "the store made its temporary directory before failing"
    assert not any(Path(p).exists() for p in made)
    assert os.listdir(tmp_path) == []


async def test_a_block_file_cut_short_grows_back_and_its_lost_blocks_are_misses(
    tmp_path: Path,
) -> None:
    """docs/durability.md: a block file is never shrunk; one cut short grows
    back (its missing blocks fail their checksum: misses)."""
    keys = [1, 2, 3, 4]
    data = await fill(tmp_path, keys, stripes=1)
    path = tmp_path / "blocks.bin"
    full = path.stat().st_size
    assert full == 16 * BB
    os.truncate(path, 0)
    with anyio.fail_after(30):
        async with kvactors.open(config(tmp_path, stripes=1)) as kv:
            assert path.stat().st_size == full  # grown back at open
            out = torch.zeros(4, BB, dtype=torch.uint8)
            with pytest.raises(IntegrityError) as info:
                await kv.load(keys, out)
            assert sorted(info.value.keys) == keys
            assert (await kv.lookup(keys)).hits == 0  # misses from now on
            assert (await kv.load(keys, out, partial=True)).tiers == []
            assert (await kv.stats()).policy.corrupted == 4
            stored = await kv.store(keys, data)  # the tier takes them again
            assert stored is not None
            assert sorted(stored.durable) == keys
        async with kvactors.open(config(tmp_path, stripes=1)) as kv:
            await kv.load(keys, out)
            assert torch.equal(out, data)
