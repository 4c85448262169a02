"""Transfers: what a plan is made of, and the one function that moves bytes.

A :class:`Transfer` is a (source, destination) pair of slot lists on named
media, as vLLM's offloading worker forwards a ``(src spec, dst spec)`` pair to
the handler registered for ``(src medium, dst medium)``. Names are tier names
(``"cpu"``, ``"nvme"``, ...) or :data:`CALLER`, the request's own side: its
GPU-pool slot ids or its tensor, whose ids are positions in the request. A plan
is an ordered list of transfers; the coordinator runs them in order, each on
the tier actor of the medium doing the I/O (:func:`runner`), and reports which
succeeded.

:func:`move` copies one transfer's bytes, blocking: memory to memory as one
row copy; between a memory side and a buffer medium (files, a remote store)
through host byte views of the memory side's rows, staged through host memory
only when the memory side is on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import msgspec
import torch

from kvactors.errors import IntegrityError
from kvactors.keys import Key
from kvactors.media import BlockMedium, CopyPool, copy_rows, row_buffers

__all__ = ["CALLER", "REQUIRED", "Role", "Side", "Transfer", "move", "runner"]

CALLER = "caller"
"""The name a plan gives the request's own side (``src`` of a store, ``dst`` of a load)."""

Role = Literal["demote", "store", "through", "promote", "load"]
"""Why a transfer is in a plan: ``store`` (request -> top tier), ``through``
(top tier -> a deeper one at once, under ``write_through``), ``demote`` (an
evicted block down one tier), ``promote`` (a deeper block up into the top
tier), ``load`` (a tier -> the request)."""

REQUIRED: frozenset[str] = frozenset({"store", "promote", "load"})
"""Roles whose failure fails the request (the rest of its plan is skipped);
a failed ``demote`` loses its victims, a failed ``through`` leaves the blocks
not durable, and the request goes on."""


class Transfer(msgspec.Struct, frozen=True):
    """Copy slot ``src_ids[i]`` of ``src`` into slot ``dst_ids[i]`` of ``dst``, for
    block ``keys[i]``."""

    src: str
    src_ids: list[int]
    dst: str
    dst_ids: list[int]
    keys: list[Key]
    role: Role


def runner(transfer: Transfer, chain: list[str]) -> str:
    """The tier whose actor runs ``transfer``: of its two ends, the one deeper in
    ``chain`` (the request's side and the GPU pool sit above every tier), so
    NVMe reads and writes run in the NVMe tier's threads."""
    src = chain.index(transfer.src) if transfer.src in chain else -1
    dst = chain.index(transfer.dst) if transfer.dst in chain else -1
    return chain[max(src, dst)]


class Side:
    """One end of a transfer, resolved: a medium or a caller's tensor, and its ids."""

    __slots__ = ("ids", "medium", "name", "rows")

    def __init__(
        self, name: str, ids: list[int], medium: BlockMedium | None, rows: torch.Tensor | None
    ) -> None:
        self.name = name
        self.ids = ids
        self.medium = medium
        # The rows tensor of a memory side: the medium's own, or the caller's.
        self.rows = rows if rows is not None else medium.tensor() if medium else None

    def __repr__(self) -> str:
        return f"Side({self.name}, {len(self.ids)} blocks)"


@contextlib.contextmanager
def _device_stream(*tensors: torch.Tensor | None) -> Iterator[None]:
    """Run CUDA copies on a side stream and wait for it (nothing on the host)."""
    cuda = next((t.device for t in tensors if t is not None and t.device.type == "cuda"), None)
    if cuda is None:
        yield
        return
    stream = torch.cuda.Stream(cuda)  # type: ignore[no-untyped-call]
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def check_read(side: Side, bad: list[int], keys: list[Key]) -> None:
    if bad:
        bad_keys = [keys[i] for i in bad]
        raise IntegrityError(
            f"tier {side.name!r}: {len(bad)} block(s) failed their checksum: {bad_keys[:8]!r}",
            bad_keys,
        )


_Read = Callable[[list[int], list[memoryview], list[Key] | None], list[int]]


def _reader(medium: BlockMedium, *, private: bool) -> _Read:
    """How to read ``medium``'s blocks into host buffers: into ``private`` ones
    (nobody reads them before the transfer completed: a tier's own slots, a
    staging tensor) with the medium's ``read_slots`` where it has one (a remote
    store then verifies each value where it landed, with no staging copy),
    else with ``read_buffers``."""
    slots: _Read | None = getattr(medium, "read_slots", None) if private else None
    return slots or medium.read_buffers


def move(src: Side, dst: Side, keys: list[Key], pool: CopyPool | None = None) -> None:
    """Copy ``src``'s slots into ``dst``'s (blocking); blocks read from a buffer
    medium are verified against ``keys`` (:class:`IntegrityError` names the bad
    ones), and a buffer medium written indexes them under ``keys``."""
    s, d = src.rows, dst.rows
    n = len(keys)
    if s is not None and d is not None:
        with _device_stream(s, d):
            copy_rows(s, src.ids, d, dst.ids, pool)
        return
    if s is not None:
        assert dst.medium is not None
        if s.device.type != "cpu":
            with _device_stream(s):
                host = s[torch.tensor(src.ids, device=s.device)].cpu()
            dst.medium.write_buffers(dst.ids, row_buffers(host, range(n)), keys)
        else:
            dst.medium.write_buffers(dst.ids, row_buffers(s, src.ids), keys)
        return
    assert src.medium is not None
    if d is not None and d.device.type == "cpu":
        # A tier's own slots are read by no one until the plan completes.
        read = _reader(src.medium, private=dst.medium is not None)
        check_read(src, read(src.ids, row_buffers(d, dst.ids), keys), keys)
        return
    stage = torch.empty((n, src.medium.block_bytes), dtype=torch.uint8)
    bufs = row_buffers(stage, range(n))
    check_read(src, _reader(src.medium, private=True)(src.ids, bufs, keys), keys)
    if d is not None:
        with _device_stream(d):
            copy_rows(stage, list(range(n)), d, dst.ids)
    else:
        assert dst.medium is not None
        dst.medium.write_buffers(dst.ids, bufs, keys)
