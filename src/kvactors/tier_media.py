"""The three media as the tier actors see them (:class:`~kvactors.tier_actor.BlockMedium`).

- :class:`MemoryPool`: ``num_blocks x block_bytes`` bytes in one torch tensor;
  the GPU pool (CUDA, or ``device="cpu"`` without a GPU) and the CPU tier
  (pinned when CUDA exists).
- :class:`FileStore`: NVMe slots in one preallocated file, slot ``i`` at offset
  ``i * block_bytes``, read and written with POSIX ``pread``/``pwrite`` (runs of
  adjacent slots merged into one call).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from kvactors.config import Config
from kvactors.errors import ConfigError, TransferError

__all__ = ["FileStore", "MemoryPool", "build_media", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"gpu.device: {name!r} asked for, but CUDA is not available")
    return torch.device(name)


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """Split ``ids`` into runs of consecutive slots: ``(position, first_slot, length)``."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            runs.append((start, ids[start], i - start))
            start = i
    return runs


class MemoryPool:
    """Block slots in one ``(num_blocks, block_bytes)`` uint8 tensor."""

    in_memory = True

    def __init__(
        self, name: str, num_blocks: int, block_bytes: int, device: torch.device, pin: bool = False
    ) -> None:
        self.name = name
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.device = device
        self.data = torch.zeros(
            (num_blocks, block_bytes),
            dtype=torch.uint8,
            device=device,
            pin_memory=pin and device.type == "cpu" and torch.cuda.is_available(),
        )

    def _index(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def rows(self, ids: list[int]) -> torch.Tensor:
        """A copy of slots ``ids`` as ``(n, block_bytes)``."""
        return self.data.index_select(0, self._index(ids))

    def write_rows(self, ids: list[int], rows: torch.Tensor) -> None:
        self.data.index_copy_(0, self._index(ids), rows.to(self.device, non_blocking=True))

    def read_into(self, ids: list[int], rows: torch.Tensor) -> None:
        if rows.device == self.device:
            torch.index_select(self.data, 0, self._index(ids), out=rows)
        else:
            rows.copy_(self.rows(ids), non_blocking=False)

    def write_from(self, ids: list[int], rows: torch.Tensor) -> None:
        self.write_rows(ids, rows)

    def drop(self, ids: list[int]) -> None:
        del ids  # memory slots need no cleanup

    def close(self) -> None:
        pass


class FileStore:
    """NVMe block slots in one preallocated file under ``directory``.

    ``directory=None`` makes a temporary directory, removed on :meth:`close`.
    """

    in_memory = False

    def __init__(
        self, name: str, num_blocks: int, block_bytes: int, directory: str | None = None
    ) -> None:
        self.name = name
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self._tmp = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="kvactors-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "blocks.bin"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(self.fd, num_blocks * block_bytes)
        except OSError:
            os.close(self.fd)
            raise

    def read_into(self, ids: list[int], rows: torch.Tensor) -> None:
        host = rows if rows.device.type == "cpu" else torch.empty_like(rows, device="cpu")
        buf = memoryview(host.numpy()).cast("B")  # type: ignore[arg-type]
        bb = self.block_bytes
        for pos, slot, n in _runs(ids):
            want = n * bb
            got = os.preadv(self.fd, [buf[pos * bb : pos * bb + want]], slot * bb)
            if got != want:
                where = f"slots {slot}..{slot + n - 1}"
                raise TransferError(f"{self.name}: short read of {where}: {got} of {want} bytes")
        if host is not rows:
            rows.copy_(host)

    def write_from(self, ids: list[int], rows: torch.Tensor) -> None:
        host = rows.cpu().contiguous()
        buf = memoryview(host.numpy()).cast("B")  # type: ignore[arg-type]
        bb = self.block_bytes
        for pos, slot, n in _runs(ids):
            want = n * bb
            done = os.pwritev(self.fd, [buf[pos * bb : pos * bb + want]], slot * bb)
            if done != want:
                raise TransferError(
                    f"{self.name}: short write of slots {slot}..{slot + n - 1}: {done} of {want}"
                )

    def drop(self, ids: list[int]) -> None:
        del ids

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if self._tmp:
                shutil.rmtree(self.directory, ignore_errors=True)


def build_media(config: Config) -> tuple[MemoryPool, MemoryPool, FileStore | None]:
    """The GPU pool, the CPU tier and the NVMe store a config describes."""
    device = resolve_device(config.gpu.device)
    gpu = MemoryPool("gpu", config.gpu.num_blocks, config.block_bytes, device)
    cpu = MemoryPool("cpu", config.cpu.num_blocks, config.block_bytes, torch.device("cpu"), True)
    nvme = None
    if config.nvme is not None:
        nvme = FileStore("nvme", config.nvme.num_blocks, config.block_bytes, config.nvme.directory)
    return gpu, cpu, nvme
