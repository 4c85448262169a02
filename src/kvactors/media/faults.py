"""Faults injected into the NVMe store's I/O, on the path users run.

A :class:`~kvactors.media.file_store.FileStore` asks its ``faults`` object
(``None`` in production) about every system call it plans, in the compiled
I/O loop and in the Python one alike: :class:`Faults` is what it asks.
:class:`InjectedFaults` is the
seeded random one ``kvactors bench soak`` and the tests use; all its state is
its own (nothing module-level).
"""

from __future__ import annotations

import errno
import random
import threading
from typing import Protocol

__all__ = ["Faults", "InjectedFaults"]


class Faults(Protocol):
    """Faults injected into a :class:`FileStore`'s I/O, on the path users run
    (the compiled loop included): set :attr:`FileStore.faults`.

    ``on_io`` is asked once per system call planned (one run of adjacent slots
    of one file): ``0`` runs it, a negative ``-errno`` fails it with that error
    without touching the file, a positive ``n`` smaller than ``nbytes``
    transfers only the first ``n`` bytes (a short call). ``on_read`` sees the
    buffers of each read that completed and may change their bytes (a device
    returning bad data). Both may be called from I/O threads at once.
    """

    def on_io(self, write: bool, stripe: int, offset: int, nbytes: int) -> int: ...

    def on_read(self, buffers: list[memoryview]) -> None: ...


class InjectedFaults:
    """Fail a fraction of writes (and reads) with an errno, cut some calls short,
    flip a byte in some reads; counts what it did.

    ``p_write``: probability that a write call fails with ``write_errno``
    (``ENOSPC`` by default: a full disk). ``p_read_error``: that a read call
    fails with ``EIO``. ``p_short``: that a call of either kind transfers only
    half its bytes. ``p_corrupt``: that a completed read has one byte flipped.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        p_write: float = 0.0,
        p_read_error: float = 0.0,
        p_short: float = 0.0,
        p_corrupt: float = 0.0,
        write_errno: int = errno.ENOSPC,
    ) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.p_write = p_write
        self.p_read_error = p_read_error
        self.p_short = p_short
        self.p_corrupt = p_corrupt
        self.write_errno = write_errno
        self.writes_failed = 0
        self.reads_failed = 0
        self.short_calls = 0
        self.reads_corrupted = 0

    @property
    def count(self) -> int:
        """Every fault injected so far."""
        return self.writes_failed + self.reads_failed + self.short_calls + self.reads_corrupted

    def on_io(self, write: bool, stripe: int, offset: int, nbytes: int) -> int:
        with self._lock:
            roll = self._rng.random()
            if write and roll < self.p_write:
                self.writes_failed += 1
                return -self.write_errno
            if not write and roll < self.p_read_error:
                self.reads_failed += 1
                return -errno.EIO
            if nbytes > 1 and self._rng.random() < self.p_short:
                self.short_calls += 1
                return nbytes // 2
        return 0

    def on_read(self, buffers: list[memoryview]) -> None:
        with self._lock:
            if not buffers or self._rng.random() >= self.p_corrupt:
                return
            self.reads_corrupted += 1
            buf = buffers[self._rng.randrange(len(buffers))]
            if len(buf):
                at = self._rng.randrange(len(buf))
                buf[at] ^= 0xFF
