"""Opening an NVMe index directory: its geometry record, recovery from the
snapshot and the logs after it, and creating a log file with its header.

:class:`IndexRecovery` is the part of :class:`~kvactors.media.nvme_index.NVMeIndex`
that runs at open (and creates each new log generation); the module docstring
of :mod:`kvactors.media.nvme_index` gives the files and their crash argument.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path

from kvactors.errors import ConfigError, IndexDamagedError
from kvactors.media.index_format import (
    LOG_HEAD,
    LOG_MAGIC,
    META,
    META_MAGIC,
    VERSION,
    fsync_dir,
    read_file,
    read_head,
    write_atomic,
)
from kvactors.media.index_snapshot import SnapshotFiles

__all__ = ["IndexRecovery"]


class IndexRecovery(SnapshotFiles):
    """Geometry, recovery and log creation (a base of
    :class:`~kvactors.media.nvme_index.NVMeIndex`, whose state it uses)."""

    torn_tail: bool
    quarantined: list[Path]
    load_seconds: tuple[float, float]

    # -- geometry -------------------------------------------------------------------

    def _meta_bytes(self) -> bytes:
        head = META.pack(META_MAGIC, VERSION, self.stripes, self.block_bytes, self.num_blocks, 0, 0)
        return head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))

    def _check_meta(self, data_files: list[Path]) -> None:
        path = self.meta_path
        if not path.exists() and not path.is_symlink():
            # The first file of the index's own there: a block file, the
            # snapshot, a log (only a name the index writes is one: index.01.log is not).
            found = next(
                (p for p in [*data_files, self.snap_path] if p.exists()),
                next((self._log_path(g) for g in self._logs()), None),
            )
            if found is not None:
                raise IndexDamagedError(
                    f"{path} is missing but {found.name} exists: the directory's geometry "
                    "(block_bytes, num_blocks, stripes) is unknown, so it is not reopened; "
                    "move the directory away or restore the file"
                )
            write_atomic(path, self._meta_bytes(), sync=self.sync)
            return
        data = read_file(path)
        if len(data) != META.size or zlib.crc32(data[:-4]) != META.unpack(data)[-1]:
            raise IndexDamagedError(
                f"{path} is damaged (not a kvactors geometry record): the directory's "
                "block_bytes / num_blocks / stripes are unknown, so it is not reopened"
            )
        magic, version, stripes, bb, nb, _, _ = META.unpack(data)
        if magic != META_MAGIC or version != VERSION:
            raise IndexDamagedError(f"{path}: index version {version} is not supported")
        if (bb, nb) != (self.block_bytes, self.num_blocks):
            raise ConfigError(
                f"nvme.directory: holds blocks of {bb} bytes x {nb}, "
                f"config asks for {self.block_bytes} x {self.num_blocks}"
            )
        if stripes != self.stripes:
            raise ConfigError(
                f"nvme.directory: its blocks are spread over {stripes} file(s), "
                f"config asks for nvme.stripes = {self.stripes}"
            )

    # -- recovery -------------------------------------------------------------------

    def _quarantine(self, path: Path) -> None:
        n = 0
        while (target := path.with_name(f"{path.name}.damaged{n or ''}")).exists():
            n += 1
        os.replace(path, target)
        self.quarantined.append(target)

    def _remove_stale(self) -> None:
        """Remove every ``index.*.tmp``: a crash while writing it, never renamed,
        never used. A directory of that name no crash leaves: refused, named."""
        for stale in self.directory.glob("index.*.tmp"):
            if stale.is_dir() and not stale.is_symlink():
                raise IndexDamagedError(f"{stale} is a directory, not an index file; move it away")
            stale.unlink()

    def _load(self) -> int:
        """Snapshot, then every log from its generation on; the newest generation."""
        covered = 0
        t0 = time.perf_counter()
        if self.snap_path.exists() or self.snap_path.is_symlink():
            covered = self._load_snapshot()
            if covered < 0:
                # Keep the entries that verified (each record has its own CRC),
                # set the file aside and replay every log there is.
                self._quarantine(self.snap_path)
                covered = 0
        gens = self._logs()
        for gen in gens:
            if gen < covered:
                self._log_path(gen).unlink()  # retired by the snapshot
        gens = [g for g in gens if g >= covered]
        t1 = time.perf_counter()
        for i, gen in enumerate(gens):
            self._replay(gen, last=i == len(gens) - 1)
        self.load_seconds = (t1 - t0, time.perf_counter() - t1)
        return max([covered, *self._logs()], default=0) or 1

    def _replay(self, gen: int, *, last: bool) -> None:
        path = self._log_path(gen)
        head = LOG_HEAD.size
        data = read_head(path, head)
        if len(data) < head:
            # Created but its header never reached the disk: nothing was in it.
            if data.strip(b"\0") and not last:
                self._quarantine(path)
            else:
                path.unlink()
                self.torn_tail = self.torn_tail or bool(data)
            return
        magic, version, _, got_gen, crc = LOG_HEAD.unpack_from(data)
        bad_head = magic != LOG_MAGIC or version != VERSION or got_gen != gen
        if bad_head or zlib.crc32(data[: head - 8]) != crc:
            self._quarantine(path)
            return
        applied, end, intact = self._apply_file(path, head)
        self.log_records += applied
        if not intact:
            # A torn append (or damage): cut the log there so new records follow good ones.
            self.torn_tail = True
            with open(path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())

    # -- log files ------------------------------------------------------------------

    def _log_header(self, gen: int) -> bytes:
        head = LOG_HEAD.pack(LOG_MAGIC, VERSION, 0, gen, 0)
        return (
            head[: LOG_HEAD.size - 8]
            + struct.pack("<I", zlib.crc32(head[: LOG_HEAD.size - 8]))
            + bytes(4)
        )

    def _create_log(self, gen: int) -> int:
        """The descriptor of log ``gen``, its header durable (created if new)."""
        path = self._log_path(gen)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if os.fstat(fd).st_size == 0:
                os.write(fd, self._log_header(gen))
                if self.sync:
                    os.fsync(fd)
                    fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return fd
