"""Media: bytes only, blocking calls run off the event loop.

- :mod:`~kvactors.media.base`: the :class:`BlockMedium` protocol every medium follows.
- :mod:`~kvactors.media.memory`: :class:`MemoryPool` (GPU pool, CPU tier), :func:`copy_rows`.
- :mod:`~kvactors.media.file_store`: :class:`FileStore`, the NVMe tier's files.
- :mod:`~kvactors.media.nvme_index`: the file store's crash-safe on-disk index.
- :mod:`~kvactors.media.kvikio_io`: GPUDirect Storage I/O where the CUDA driver loads.
"""

from __future__ import annotations

import torch

from kvactors.config import Config
from kvactors.media.base import BlockMedium
from kvactors.media.file_store import FileStore
from kvactors.media.kvikio_io import kvikio_available, resolve_nvme_backend
from kvactors.media.memory import MemoryPool, copy_rows, resolve_device

__all__ = [
    "BlockMedium",
    "FileStore",
    "MemoryPool",
    "build_media",
    "copy_rows",
    "kvikio_available",
    "resolve_device",
    "resolve_nvme_backend",
]


def build_media(config: Config) -> tuple[MemoryPool, MemoryPool, FileStore | None]:
    """The GPU pool, the CPU tier and the NVMe store a config describes."""
    device = resolve_device(config.gpu.device)
    gpu = MemoryPool("gpu", config.gpu.num_blocks, config.block_bytes, device)
    cpu = MemoryPool("cpu", config.cpu.num_blocks, config.block_bytes, torch.device("cpu"), True)
    nvme = None
    if config.nvme is not None:
        # A temporary directory dies with the process: no fsync needed there.
        nvme = FileStore(
            "nvme",
            config.nvme.num_blocks,
            config.block_bytes,
            config.nvme.directory,
            durable=config.nvme.directory is not None,
            backend=resolve_nvme_backend(config.nvme.backend),
            io_threads=max(2, config.nvme.stripes),
            stripes=config.nvme.stripes,
        )
    return gpu, cpu, nvme
