"""kvikio (GPUDirect Storage) I/O for the NVMe store, where the CUDA driver loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvactors.errors import ConfigError


def kvikio_available() -> bool:
    """Whether kvikio imports and the CUDA driver loads (GDS or kvikio's compat mode)."""
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
        import kvikio  # noqa: F401
    except (OSError, ImportError):
        return False
    return True


def resolve_nvme_backend(name: str) -> str:
    """``"kvikio"`` or ``"posix"`` for a configured ``nvme.backend``."""
    if name == "posix":
        return "posix"
    available = kvikio_available()
    if name == "kvikio" and not available:
        raise ConfigError(
            "nvme.backend: 'kvikio' asked for, but kvikio or the CUDA driver (libcuda.so.1) "
            "cannot be loaded here; use 'auto' or 'posix'"
        )
    return "kvikio" if available else "posix"


class _KvikioIO:
    """``preadv`` / ``pwritev`` with the POSIX signatures, through one ``kvikio.CuFile``.

    kvikio uses GPUDirect Storage where the driver and file system allow it and
    its own thread pool of POSIX calls otherwise. Reads land in host memory so
    each block's checksum can be verified before it is used.
    """

    def __init__(self, paths: dict[int, Path]) -> None:
        import kvikio

        # One CuFile per stripe, found by the POSIX descriptor of the same file.
        self.files = {fd: kvikio.CuFile(path, "r+") for fd, path in paths.items()}

    def _each(self, call: Callable[..., object], buffers: list[memoryview], offset: int) -> int:
        """One kvikio request per buffer at consecutive offsets, all in flight
        together; the bytes done, stopping at the first short one."""
        futures = []
        for buf in buffers:
            futures.append(call(buf, len(buf), offset))
            offset += len(buf)
        done = 0
        short = False
        for buf, fut in zip(buffers, futures):
            n = int(fut.get())  # type: ignore[attr-defined]
            if not short:
                done += n
                short = n != len(buf)
        return done

    def preadv(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        return self._each(self.files[fd].pread, buffers, offset)

    def pwritev(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        return self._each(self.files[fd].pwrite, buffers, offset)

    def close(self) -> None:
        for file in self.files.values():
            file.close()
