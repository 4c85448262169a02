"""Opening a :class:`~kvactors.media.file_store.FileStore` directory: the
directory's lock, the files' sizes against the free space of the disk, the
index (recovered from what the directory holds), the block files sized to their
slots, and whether reads and writes go past the page cache (``O_DIRECT``
descriptors beside the buffered ones); and letting them all go again.

:class:`FileDirectory` is that part of ``FileStore`` (a base whose state it
uses); reads and writes are in :mod:`kvactors.media.file_store`.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from kvactors.errors import CacheLockedError, ConfigError, IndexDamagedError, StoreOpenError
from kvactors.media.index_format import check_regular
from kvactors.media.nvme_index import NVMeIndex

__all__ = ["DIRECT_ALIGN", "FileDirectory", "startup_error"]

DIRECT_ALIGN = 4096  # offsets, lengths and (else bounced) buffers of O_DIRECT I/O


def startup_error(path: Path, exc: OSError) -> StoreOpenError:
    """The error an ``OSError`` while opening ``path`` becomes."""
    what = exc.strerror or str(exc)
    return StoreOpenError(f"nvme.directory: cannot open {path}: {what}")


class FileDirectory:
    """The directory, its lock, index and block files (a base of
    :class:`~kvactors.media.file_store.FileStore`, whose state it uses)."""

    directory: Path
    paths: list[Path]
    num_blocks: int
    block_bytes: int
    durable: bool
    backend: str
    fds: list[int]
    direct_fds: list[int]
    index: NVMeIndex
    _lock_fd: int
    _tmp: bool  # a temporary directory (made by the store, removed on close)
    fresh: bool  # start empty: the store's files from an earlier opening are deleted

    def _clear(self) -> None:
        """Delete the files a store keeps in the directory (index, logs, snapshots,
        quarantined copies, block files of any stripe count; nothing else), the
        lock held."""
        for pattern in ("index.*", "blocks.bin", "blocks.*.bin"):
            for path in self.directory.glob(pattern):
                if path.is_file() or path.is_symlink():
                    path.unlink()

    def _open(self, num_blocks: int, block_bytes: int, stripes: int) -> None:
        """Lock the directory, check sizes, recover the index, open the files."""
        if self.directory.exists() and not self.directory.is_dir():
            raise StoreOpenError(f"nvme.directory: {self.directory} exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheLockedError(
                f"{self.directory} is in use by another kvactors process"
            ) from None
        if self.fresh:
            self._clear()
        for path in self.paths:
            check_regular(path, "a block file")
        sizes = [(num_blocks - k + stripes - 1) // stripes * block_bytes for k in range(stripes)]
        self._check_space(sizes)
        self.index = NVMeIndex(
            self.directory,
            block_bytes,
            num_blocks,
            stripes,
            data_files=self.paths,
            sync=self.durable,
        )
        try:
            for path, size in zip(self.paths, sizes):
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                self.fds.append(fd)
                # The file of stripe k holds slots k, k + stripes, k + 2 * stripes, ...
                have = os.fstat(fd).st_size
                if have > size:  # never shrink a file that holds blocks
                    raise IndexDamagedError(
                        f"{path} holds {have} bytes, more than {size} for its "
                        f"{block_bytes}-byte slots: not the file index.meta describes"
                    )
                if have < size:
                    os.ftruncate(fd, size)
        except BaseException:
            self.index.close()
            raise

    def _open_direct(self, io: str, *, compiled: bool) -> str:
        """``"direct"`` (O_DIRECT descriptors opened beside the buffered ones) or
        ``"buffered"``, for the configured ``nvme.io``.

        ``auto`` is direct for a named directory on a file system that takes
        O_DIRECT with page-multiple blocks, buffered otherwise (a temporary
        directory, a file system refusing O_DIRECT, odd block sizes). ``compiled``: whether the
        compiled I/O core is there (direct I/O runs only on it).
        """
        if io == "buffered" or (io == "auto" and self._tmp):
            return "buffered"
        if self.block_bytes % DIRECT_ALIGN:
            if io == "direct":
                raise ConfigError(
                    f"nvme.io = 'direct' needs block_bytes a multiple of {DIRECT_ALIGN}, "
                    f"got {self.block_bytes}"
                )
            return "buffered"
        if not compiled or self.backend == "kvikio":
            if io == "direct":
                raise ConfigError(
                    "nvme.io = 'direct' needs the compiled I/O core and the posix backend"
                )
            return "buffered"
        for path in self.paths:
            try:
                self.direct_fds.append(os.open(path, os.O_RDWR | os.O_DIRECT))
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise  # not the file system's answer (EMFILE, ...): a StoreOpenError
                if io == "direct":
                    raise ConfigError(
                        f"nvme.io = 'direct': {path} cannot be opened with O_DIRECT: {exc.strerror}"
                    ) from exc
                for fd in self.direct_fds:
                    os.close(fd)
                self.direct_fds = []
                return "buffered"
        return "direct"

    def _check_space(self, sizes: list[int]) -> None:
        """The files' bytes not yet on disk must fit its free space."""
        missing = 0
        for path, size in zip(self.paths, sizes):
            try:
                st = os.stat(path)
                missing += max(0, size - st.st_blocks * 512)
            except FileNotFoundError:
                missing += size
        # Room for the index too: a snapshot and a log of every slot, as an upper bound.
        missing += 2 * 64 * self.num_blocks
        vfs = os.statvfs(self.directory)
        free = vfs.f_bavail * vfs.f_frsize
        if missing > free:
            raise ConfigError(
                f"nvme.num_blocks: {self.num_blocks} blocks of {self.block_bytes} bytes need "
                f"{missing / 2**30:.1f} GiB more on the disk of {self.directory}, "
                f"which has {free / 2**30:.1f} GiB free"
            )

    def _release(self) -> None:
        for fd in self.fds + self.direct_fds:
            os.close(fd)
        self.fds = []
        self.direct_fds = []
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1
