"""Media: bytes only, blocking calls run off the event loop.

- :mod:`~kvactors.media.base`: the :class:`BlockMedium` protocol every medium follows.
- :mod:`~kvactors.media.memory`: :class:`MemoryPool` (GPU pool, CPU tier), :func:`copy_rows`,
  :class:`CopyPool` (a cache's helper threads for large host copies).
- :mod:`~kvactors.media.file_store`: :class:`FileStore`, the NVMe tier's files.
- :mod:`~kvactors.media.nvme_index`: the file store's crash-safe on-disk index.
- :mod:`~kvactors.media.kvikio_io`: GPUDirect Storage I/O where the CUDA driver loads.
- :mod:`~kvactors.media.faults`: faults injected into the file store's I/O path.

:func:`open_media` builds what a config describes: the GPU pool, then one
medium per tier of the chain (``Config.chain()``, each through its config
entry's ``open_medium``), after :func:`check_sizes` has checked them against
this machine.
"""

from __future__ import annotations

import os

import torch

from kvactors.config import Config
from kvactors.errors import ConfigError
from kvactors.media.base import BlockMedium, Recovered
from kvactors.media.file_store import FileStore
from kvactors.media.kvikio_io import kvikio_available, resolve_nvme_backend
from kvactors.media.memory import CopyPool, MemoryPool, copy_rows, resolve_device, row_buffers

__all__ = [
    "BlockMedium",
    "CopyPool",
    "FileStore",
    "MemoryPool",
    "Recovered",
    "check_sizes",
    "copy_rows",
    "kvikio_available",
    "open_media",
    "resolve_device",
    "resolve_nvme_backend",
    "row_buffers",
]

METADATA_BYTES_PER_SLOT = 128
"""What one slot of a tier costs in host memory for its manager, at most (the
compiled core allocates 38 B per slot under lru, 122 B under arc, up front)."""


def _host_memory() -> int:
    """Host memory new pools can have now, in bytes: ``MemAvailable`` of
    ``/proc/meminfo`` (Linux), else the machine's physical memory (0 when unknown).

    Not the physical memory: the pools are zero-filled, so pools that fit the
    machine's total but not what the other processes leave are killed by the
    kernel's out-of-memory killer while they are filled, with no error to report.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                name, _, value = line.partition(":")
                if name == "MemAvailable":
                    return int(value.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):  # not Linux, or an unexpected format
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - not a POSIX host
        return 0


def _gib(n: float) -> str:
    try:
        return f"{n / 2**30:.1f} GiB"
    except OverflowError:  # an int past a float's range (a huge block_bytes)
        return f"{int(n) // 2**30} GiB"


def check_sizes(config: Config, device: torch.device) -> None:
    """Raise :class:`~kvactors.errors.ConfigError` naming the field when the pools a
    config asks for cannot fit this machine: host memory (the CPU tier, a GPU
    pool on ``device="cpu"``, every tier's slot metadata) and the GPU's memory.
    Nothing is allocated before this passes."""
    bb = config.block_bytes
    host = _host_memory()
    wanted: list[tuple[str, int]] = []  # (field, host bytes)
    gpu_bytes = config.gpu.num_blocks * bb
    if device.type == "cpu":
        wanted.append(("gpu.num_blocks", gpu_bytes))
    elif device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        if gpu_bytes > free:
            raise ConfigError(
                f"gpu.num_blocks: {config.gpu.num_blocks} blocks x {bb} bytes = "
                f"{_gib(gpu_bytes)}, more than the {_gib(free)} free on {device}"
            )
    for name, spec in config.chain():
        meta = spec.num_blocks * METADATA_BYTES_PER_SLOT
        if name == "cpu":
            wanted.append(("cpu.num_blocks", spec.num_blocks * bb + meta))
        else:
            wanted.append((f"{name}.num_blocks", meta))
    if host:
        total = 0
        for field, nbytes in wanted:
            total += nbytes
            if total > host:
                raise ConfigError(
                    f"{field}: the pools up to this one need {_gib(total)} of host memory "
                    f"(block_bytes = {bb}); this machine has {_gib(host)} available"
                )
    # The disk under an NVMe directory is checked by the file store when it opens.


def open_media(config: Config) -> tuple[MemoryPool, list[BlockMedium]]:
    """The GPU pool and one opened medium per tier of ``config.chain()``, top first.

    Sizes are checked first (:func:`check_sizes`); if opening one medium fails,
    those already opened are closed before the error propagates.
    """
    device = resolve_device(config.gpu.device)
    check_sizes(config, device)
    gpu = MemoryPool("gpu", config.gpu.num_blocks, config.block_bytes, device)
    chain: list[BlockMedium] = []
    try:
        for name, spec in config.chain():
            chain.append(spec.open_medium(name, config))
    except BaseException:
        for medium in chain:
            medium.close()
        gpu.close()
        raise
    return gpu, chain
