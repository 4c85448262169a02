"""Memory media: :class:`MemoryPool` (``num_blocks x block_bytes`` bytes in one torch
tensor: the GPU pool, CUDA or ``device="cpu"`` without a GPU, and the CPU tier,
pinned when CUDA exists) and :func:`copy_rows`, the row copy every transfer between
memory media uses.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

import torch

from kvactors.config import DEVICE_NAMES, is_device_name
from kvactors.errors import ConfigError, TensorSpecError
from kvactors.keys import Key


def resolve_device(name: str, field: str = "gpu.device") -> torch.device:
    """A device setting (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, named
    ``field`` in errors) as a torch device; ConfigError when it is none of those
    (:func:`~kvactors.config.is_device_name`: ``"cuda:01"``, ``"cuda: 1"``), names
    CUDA where there is none, or a CUDA device ``cuda:N`` past the ones there are."""
    if not is_device_name(name):
        raise ConfigError(f"{field}: expected {DEVICE_NAMES}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{field}: {name!r} asked for, but CUDA is not available")
    if name.startswith("cuda:") and int(name[5:]) >= (count := torch.cuda.device_count()):
        raise ConfigError(f"{field}: {name!r} asked for, but CUDA has {count} devices")
    return torch.device(name)


def slot_ints(ids: Iterable[Any], what: str) -> list[int]:
    """The ints of slot ids (Python, numpy and torch integers); a bool, a float, a
    string, a torch tensor that is not a 0-d integer (a one-element vector,
    which ``operator.index`` would take) raise
    :class:`~kvactors.errors.TensorSpecError` naming ``what``."""
    checked: list[int] = []
    for i in ids:
        if isinstance(i, bool) or (
            isinstance(i, torch.Tensor)
            and (i.dim() != 0 or i.dtype == torch.bool or i.is_floating_point() or i.is_complex())
        ):
            raise TensorSpecError(f"{what}: slot ids must be integers, got {i!r}")
        try:
            checked.append(operator.index(i))
        except TypeError:
            raise TensorSpecError(f"{what}: slot ids must be integers, got {i!r}") from None
    return checked


T = TypeVar("T")
P = TypeVar("P")
_Batch = tuple[int, list[int]]


def _fan_out(pool: ThreadPoolExecutor, fn: Callable[[P], T], parts: list[P]) -> list[T]:
    """``fn`` over each of ``parts``: the first on the calling thread (one hand-off
    fewer), the others on ``pool``. Every part has ended before this returns or
    raises, so no worker touches a caller's buffers afterwards; the first error,
    in part order, is re-raised."""
    futures = [pool.submit(fn, part) for part in parts[1:]]
    try:
        first = fn(parts[0])
    finally:
        wait(futures)
    return [first, *(future.result() for future in futures)]


def adjacent_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs adjacent in both id lists: ``(first_src, first_dst, length)``."""
    runs: list[tuple[int, int, int]] = []
    i = 0
    n = len(src_ids)
    while i < n:
        j = i + 1
        while j < n and src_ids[j] == src_ids[j - 1] + 1 and dst_ids[j] == dst_ids[j - 1] + 1:
            j += 1
        runs.append((src_ids[i], dst_ids[i], j - i))
        i = j
    return runs


SPLIT_COPY_BYTES = 4 * 2**20
"""The least bytes each thread of a split host copy moves: a copy of ``b`` bytes runs
in ``min(workers + 1, b // SPLIT_COPY_BYTES)`` parts (the copy pool's threads plus
the calling one, as one large ``Tensor.copy_`` runs over torch's threads), so a
hand-off to a helper thread always carries enough bytes to pay for itself."""


class CopyPool:
    """Helper threads for large host copies, owned by one cache and closed with it.

    Sized once, at creation, to torch's intra-op thread count minus the calling
    thread (``torch.get_num_threads() - 1``); never resized while in use.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(0, torch.get_num_threads() - 1) if workers is None else workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def executor(self) -> ThreadPoolExecutor | None:
        """The pool (made on first use); ``None`` with no workers or once closed."""
        if self.workers == 0 or self._closed:
            return None
        with self._lock:
            if self._pool is None and not self._closed:
                self._pool = ThreadPoolExecutor(self.workers, "kvactors-copy")
            return self._pool

    def close(self) -> None:
        """Wait for copies in progress, then stop the threads. Later copies run unsplit."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _copy_runs(s: Any, d: Any, runs: list[tuple[int, int, int]]) -> None:
    # numpy releases the GIL while it copies, so parts run in parallel.
    for si, di, n in runs:
        d[di : di + n] = s[si : si + n]


def _host_copy(s: Any, d: Any, runs: list[tuple[int, int, int]], pool: CopyPool | None) -> None:
    """Copy ``runs`` of rows of array ``s`` into ``d``; large copies in parallel parts."""
    total = sum(n for _, _, n in runs)
    executor = pool.executor() if pool is not None else None
    workers = pool.workers if pool is not None else 0
    parts = min(workers + 1, total, total * s.shape[1] // SPLIT_COPY_BYTES)
    if executor is None or parts < 2:
        _copy_runs(s, d, runs)
        return
    # Equal shares of rows, cutting runs where a share ends.
    share = -(-total // parts)
    chunks: list[list[tuple[int, int, int]]] = [[]]
    room = share
    for si, di, n in runs:
        while n:
            take = min(n, room)
            chunks[-1].append((si, di, take))
            si, di, n, room = si + take, di + take, n - take, room - take
            if not room and n:
                chunks.append([])
                room = share
        if not room:
            chunks.append([])
            room = share
    _fan_out(executor, functools.partial(_copy_runs, s, d), [c for c in chunks if c])


def copy_rows(
    src: torch.Tensor,
    src_ids: list[int],
    dst: torch.Tensor,
    dst_ids: list[int],
    pool: CopyPool | None = None,
) -> None:
    """``dst[dst_ids[i]] = src[src_ids[i]]`` for ``(n, block_bytes)`` tensors.

    Host to host: one ``memcpy`` per run of adjacent rows through numpy, in a
    single pass (torch's ``index_select`` + ``index_copy_`` make two through a
    temporary); with ``pool``, a copy of at least twice ``SPLIT_COPY_BYTES`` is split
    into parts of at least that many bytes over ``pool``'s threads and the calling
    one.
    With CUDA on either side: a gather on the device, then one asynchronous copy
    per run (pinned host memory makes them DMA), on the current stream.
    """
    if src.device.type == "cpu" and dst.device.type == "cpu":
        _host_copy(src.numpy(), dst.numpy(), adjacent_runs(src_ids, dst_ids), pool)
        return
    if src.device.type != "cpu":
        index = torch.tensor(src_ids, dtype=torch.long, device=src.device)
        gathered = src.index_select(0, index)
        pos = 0
        for _, di, n in adjacent_runs(list(range(len(src_ids))), dst_ids):
            dst[di : di + n].copy_(gathered[pos : pos + n], non_blocking=True)
            pos += n
        return
    for si, di, n in adjacent_runs(src_ids, dst_ids):
        dst[di : di + n].copy_(src[si : si + n], non_blocking=True)


_NULL = contextlib.nullcontext()


def row_buffers(rows: torch.Tensor, ids: Iterable[int]) -> list[memoryview]:
    """Writable byte views of rows ``ids`` of a contiguous host ``(n, block_bytes)`` tensor."""
    flat = memoryview(rows.numpy()).cast("B")  # type: ignore[arg-type]
    bb = rows.shape[1]
    return [flat[i * bb : (i + 1) * bb] for i in ids]


PAGE = 4096


def _page_aligned(
    num_blocks: int, block_bytes: int, device: torch.device, pinned: bool
) -> torch.Tensor:
    """A zeroed ``(num_blocks, block_bytes)`` tensor; on the host it starts on a page
    boundary, so rows of page-multiple blocks can go to ``O_DIRECT`` files as they are."""
    if device.type != "cpu":
        return torch.zeros((num_blocks, block_bytes), dtype=torch.uint8, device=device)
    raw = torch.zeros(num_blocks * block_bytes + PAGE, dtype=torch.uint8, pin_memory=pinned)
    skip = -raw.data_ptr() % PAGE
    return raw[skip : skip + num_blocks * block_bytes].view(num_blocks, block_bytes)


class MemoryPool:
    """Block slots in one ``(num_blocks, block_bytes)`` uint8 tensor.

    On CUDA every copy runs on the pool's own stream and the calling worker
    thread waits for that stream only, so the event loop never blocks and other
    streams keep running. The CPU tier is pinned when CUDA exists, so copies
    between it and the GPU pool are asynchronous DMA.
    """

    in_memory = True
    durable = False

    def __init__(
        self, name: str, num_blocks: int, block_bytes: int, device: torch.device, pin: bool = False
    ) -> None:
        self.name = name
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.device = device
        self.pinned = pin and device.type == "cpu" and torch.cuda.is_available()
        self.data = _page_aligned(num_blocks, block_bytes, device, self.pinned)
        self.stream = (
            torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            if device.type == "cuda"
            else None
        )

    def _on_stream(self) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.stream(self.stream) if self.stream is not None else _NULL

    def _finish(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def _slots(self, ids: object, what: str) -> list[int]:
        """``ids`` checked: a list, tuple or range of ints in ``0..num_blocks-1``."""
        if not isinstance(ids, (list, tuple, range)):
            raise TensorSpecError(
                f"{what}: slot ids must be a list, tuple or range, got {type(ids).__name__}"
            )
        checked = slot_ints(ids, what)
        for slot in checked:
            if not 0 <= slot < self.num_blocks:
                raise TensorSpecError(
                    f"{what}: {self.name} slot {slot} is out of range 0..{self.num_blocks - 1}"
                )
        return checked

    def rows(self, ids: list[int]) -> torch.Tensor:
        """A copy of slots ``ids`` as ``(n, block_bytes)`` uint8. Raises
        :class:`~kvactors.errors.TensorSpecError` for slot ids that are not
        integers in ``0..num_blocks-1``."""
        return self._rows(self._slots(ids, "rows"))

    def _rows(self, ids: list[int]) -> torch.Tensor:
        out = torch.empty((len(ids), self.block_bytes), dtype=torch.uint8, device=self.device)
        with self._on_stream():
            copy_rows(self.data, ids, out, list(range(len(ids))))
        self._finish()
        return out

    def write_rows(self, ids: list[int], rows: torch.Tensor) -> None:
        """Copy ``rows``, a ``(len(ids), block_bytes)`` uint8 tensor, into slots
        ``ids`` (blocking until done). Raises
        :class:`~kvactors.errors.TensorSpecError` for bad slot ids (a slot named
        twice included: which row it would hold is not defined) or rows."""
        slots = self._slots(ids, "write_rows")
        if len(set(slots)) != len(slots):
            twice = next(s for i, s in enumerate(slots) if s in slots[:i])
            raise TensorSpecError(f"write_rows: {self.name} slot {twice} is named twice")
        want = (len(slots), self.block_bytes)
        if (
            not isinstance(rows, torch.Tensor)
            or rows.dtype != torch.uint8
            or tuple(rows.shape) != want
        ):
            got = (
                f"shape {tuple(rows.shape)} of {rows.dtype}"
                if isinstance(rows, torch.Tensor)
                else type(rows).__name__
            )
            raise TensorSpecError(f"write_rows: rows must be a {want} uint8 tensor, got {got}")
        self._write_rows(slots, rows)

    def _write_rows(self, ids: list[int], rows: torch.Tensor) -> None:
        with self._on_stream():
            copy_rows(rows, list(range(len(ids))), self.data, ids)
        self._finish()

    def read_into(
        self, ids: list[int], rows: torch.Tensor, keys: list[Key] | None = None
    ) -> list[int]:
        with self._on_stream():
            copy_rows(self.data, ids, rows, list(range(len(ids))))
        self._finish()
        return []

    def buffers(self, ids: list[int]) -> list[memoryview]:
        """Writable byte views of slots ``ids`` (host pools only), for vectored file I/O."""
        assert self.device.type == "cpu"
        return row_buffers(self.data, ids)

    def write_from(self, ids: list[int], rows: torch.Tensor, keys: list[Key] | None = None) -> None:
        self._write_rows(ids, rows)

    def tensor(self) -> torch.Tensor:
        return self.data

    def on_stream(self) -> contextlib.AbstractContextManager[object]:
        """Run CUDA copies on the pool's own stream (a no-op on the host)."""
        return self._on_stream()

    def finish(self) -> None:
        """Wait for the pool's stream (a no-op on the host)."""
        self._finish()

    def read_buffers(
        self, ids: list[int], bufs: list[memoryview], keys: list[Key] | None = None
    ) -> list[int]:
        rows = self._rows(ids).cpu()
        for buf, row in zip(bufs, row_buffers(rows, range(len(ids)))):
            buf[:] = row
        return []

    def write_buffers(
        self, ids: list[int], bufs: list[memoryview], keys: list[Key] | None = None
    ) -> None:
        rows = torch.empty((len(ids), self.block_bytes), dtype=torch.uint8)
        for buf, view in zip(row_buffers(rows, range(len(ids))), bufs):
            buf[:] = view
        self._write_rows(ids, rows)

    def recovered(self) -> list[Any]:
        return []  # memory holds nothing across processes

    def drop(self, keys: list[Key]) -> None:
        del keys  # memory slots need no cleanup

    def close(self) -> None:
        pass
