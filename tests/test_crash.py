"""Writers killed with SIGKILL in every write mode, while the index compacts, and
with the disk full: after reopening, every block the writer saw durable is
served byte-exact, and nothing served is ever wrong."""

from __future__ import annotations

import ast
import hashlib
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import torch

import kvactors
from kvactors.cli.demo import block_bytes_for
from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig
from kvactors.errors import IntegrityError

pytestmark = pytest.mark.anyio

BB = 4096
CPU = torch.device("cpu")
NVME_BLOCKS = 1024

WRITER = textwrap.dedent(
    """
    import os, sys, anyio, torch, kvactors
    from kvactors.cli.demo import block_bytes_for
    from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig
    from kvactors.media import nvme_index
    from kvactors.media.faults import InjectedFaults

    directory, mode, variant = sys.argv[1:4]
    if variant == "compaction":
        nvme_index.MIN_LOG_RECORDS = 16  # compact every few dozen stores

    async def main():
        config = Config(
            block_bytes=4096,
            gpu=GPUConfig(num_blocks=8, device="cpu"),
            cpu=TierConfig(num_blocks=8),
            nvme=NVMeConfig(num_blocks=NVME_BLOCKS, directory=directory, backend="posix"),
            write_mode=mode,
        )
        async with kvactors.open(config) as kv:
            store = kv.medium("nvme")
            if variant == "enospc":
                store.faults = InjectedFaults(1, p_write=0.3)
            if variant == "full":  # fill the disk but for ~150 blocks' worth
                vfs = os.statvfs(directory)
                filler = os.path.join(os.path.dirname(directory), "filler")
                with open(filler, "wb") as fh:
                    fh.write(bytes(max(0, vfs.f_bavail * vfs.f_frsize - 600 * 1024)))
            for key in range(NVME_BLOCKS - 64):  # fewer than the tier holds: nothing evicted
                await kv.store([key], block_bytes_for([key], 4096, torch.device("cpu")))
                durable = [k for k in range(max(0, key - 16), key + 1) if k in store.index.by_key]
                print(key, store.index.compactions, *durable, flush=True)

    anyio.run(main)
    """
).replace("NVME_BLOCKS", str(NVME_BLOCKS))


def reopen_config(directory: Path, mode: str) -> Config:
    return Config(
        block_bytes=BB,
        gpu=GPUConfig(num_blocks=8, device="cpu"),
        cpu=TierConfig(num_blocks=8),
        nvme=NVMeConfig(num_blocks=NVME_BLOCKS, directory=str(directory), backend="posix"),
        write_mode=mode,  # type: ignore[arg-type]
    )


async def kill_writer(
    tmp_path: Path, directory: Path, mode: str, variant: str, stop_after: int
) -> tuple[set[int], int]:
    """Run the writer until it reported ``stop_after`` stores (or ended), then
    SIGKILL it; the keys it saw durable and the last key whose store returned."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(directory), mode, variant],
        stdout=subprocess.PIPE,
        text=True,
    )
    durable: set[int] = set()
    last = -1
    assert proc.stdout is not None
    with anyio.fail_after(90):
        while True:
            line = await anyio.to_thread.run_sync(proc.stdout.readline)
            if not line:
                break
            key, compactions, *seen = map(int, line.split())
            last = key
            durable.update(seen)
            if key >= stop_after and (variant != "compaction" or compactions >= 2):
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return durable, last


async def check_reopen(directory: Path, mode: str, durable: set[int], last: int) -> None:
    with anyio.fail_after(60):
        async with kvactors.open(reopen_config(directory, mode)) as kv:
            keys = list(range(last + 4))
            for key in keys:
                out = torch.empty(1, BB, dtype=torch.uint8)
                try:
                    res = await kv.load([key], out, partial=True)
                except IntegrityError:
                    res = kvactors.LoadResult([])
                if key in durable:
                    assert res.tiers == ["nvme"], f"block {key} was durable and is lost"
                if res.tiers:  # whatever is served is exact, never torn
                    assert torch.equal(out, block_bytes_for([key], BB, CPU))


@pytest.mark.parametrize(
    ("mode", "variant"),
    [
        ("write_through", "kill"),
        ("write_back", "kill"),
        ("write_through", "compaction"),
        ("write_back", "compaction"),
        ("write_through", "enospc"),
        ("write_back", "enospc"),
    ],
)
async def test_sigkill_loses_no_durable_block(tmp_path: Path, mode: str, variant: str) -> None:
    directory = tmp_path / "cache"
    durable, last = await kill_writer(tmp_path, directory, mode, variant, stop_after=200)
    assert last >= 200
    if mode == "write_through" and variant != "enospc":
        assert len(durable) >= 200  # every returned store was durable
    else:
        assert durable  # demotions (or the writes that found room) reached the disk
    await check_reopen(directory, mode, durable, last)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 5 MiB tmpfs (needs root and mount rights; else skipped)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.mark.parametrize("mode", ["write_through", "write_back"])
async def test_sigkill_with_the_disk_full(small_disk: Path, tmp_path: Path, mode: str) -> None:
    """The NVMe files fit the disk when opened (sparse), then the disk fills up
    under the stores (a real ENOSPC from the file system, on block writes and
    log appends alike). Killed then: nothing durable lost, nothing wrong served."""
    directory = small_disk / "cache"
    durable, last = await kill_writer(tmp_path, directory, mode, "full", stop_after=400)
    assert last >= 400
    assert 0 < len(durable) < 400  # some writes found room, the rest hit the full disk
    (small_disk / "filler").unlink()  # room again, for the reopen's free-space check
    await check_reopen(directory, mode, durable, last)


DURABLE_WRITER = textwrap.dedent(
    """
    import hashlib, random, sys, anyio, torch, kvactors
    from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig

    directory, mode = sys.argv[1:3]
    KEYS = [*range(40), *(b"k%d" % i for i in range(40)), *(2**70 + i for i in range(20))]

    def block(key):
        digest = hashlib.sha256(repr(key).encode()).digest()
        return torch.frombuffer(bytearray((digest * 4)[:100]), dtype=torch.uint8)

    async def main():
        config = Config(
            block_bytes=100,
            gpu=GPUConfig(num_blocks=8, device="cpu"),
            cpu=TierConfig(num_blocks=4),
            nvme=NVMeConfig(num_blocks=256, directory=directory, backend="posix", stripes=7),
            write_mode=mode,
            inline_bytes=0,
        )
        async with kvactors.open(config) as kv:
            async def client(c):
                rnd = random.Random(c)
                while True:
                    keys = rnd.sample(KEYS, rnd.randint(1, 3))
                    res = await kv.store(keys, torch.stack([block(k) for k in keys]))
                    if res is not None:
                        print(repr(res.durable), flush=True)

            async with anyio.create_task_group() as tg:
                for c in range(4):
                    tg.start_soon(client, c)

    anyio.run(main)
    """
)


@pytest.mark.parametrize("mode", ["write_through", "write_back"])
async def test_sigkill_keeps_every_key_a_store_result_listed_durable(
    tmp_path: Path, mode: str
) -> None:
    """Concurrent multi-key stores of int, long int and bytes keys over seven
    stripes, 100-byte blocks: every key a returned ``StoreResult.durable``
    listed is served from NVMe byte-exact after a SIGKILL (nothing is evicted
    from NVMe: it holds more than every key), and nothing served is wrong."""
    script = tmp_path / "writer.py"
    script.write_text(DURABLE_WRITER)
    directory = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(directory), mode], stdout=subprocess.PIPE, text=True
    )
    durable: set[object] = set()
    lines = 0
    assert proc.stdout is not None
    with anyio.fail_after(90):
        while lines < 300:
            line = await anyio.to_thread.run_sync(proc.stdout.readline)
            if not line:
                break
            durable.update(ast.literal_eval(line))
            lines += 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert lines == 300
    assert durable

    keys = [*range(40), *(b"k%d" % i for i in range(40)), *(2**70 + i for i in range(20))]
    config = Config(
        block_bytes=100,
        gpu=GPUConfig(num_blocks=8, device="cpu"),
        cpu=TierConfig(num_blocks=4),
        nvme=NVMeConfig(num_blocks=256, directory=str(directory), backend="posix", stripes=7),
        write_mode=mode,  # type: ignore[arg-type]
    )
    with anyio.fail_after(60):
        async with kvactors.open(config) as kv:
            for key in keys:
                out = torch.empty(1, 100, dtype=torch.uint8)
                try:
                    res = await kv.load([key], out, partial=True)
                except IntegrityError:
                    res = kvactors.LoadResult([])
                if key in durable:
                    assert res.tiers == ["nvme"], f"{key!r} was listed durable and is lost"
                if res.tiers:
                    digest = hashlib.sha256(repr(key).encode()).digest()
                    want = torch.frombuffer(bytearray((digest * 4)[:100]), dtype=torch.uint8)
                    assert torch.equal(out[0], want), f"{key!r} served wrong"
