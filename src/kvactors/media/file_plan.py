"""Which system calls a FileStore request makes: runs of slots adjacent in their
file, cut to a request size, and vectored calls of many buffers.

A request names slots in any order; :func:`batches` sorts them into runs of
adjacent slots per file (one ``preadv``/``pwritev`` each), :func:`pieces` cuts
long runs so several requests are in flight at once, :func:`vectored` issues one
run's call ``IOV_MAX`` buffers at a time (the Python path; the compiled loop in
``native/io_core.c`` does the same), and :func:`first_bytes` cuts a call's buffers
to a short count (an injected short call).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["IOV_MAX", "Batch", "batches", "first_bytes", "pieces", "vectored"]

Batch = tuple[int, list[int]]
"""``(first_slot, positions)``: one run of adjacent slots of one file."""


def batches(ids: list[int], stripes: int = 1) -> list[tuple[int, list[int]]]:
    """The positions of ``ids`` grouped into runs of slots adjacent in their file,
    in file order: ``(first_slot, positions)`` with
    ``ids[positions[j]] == first_slot + j * stripes``.

    Slot ``s`` lives in file ``s % stripes`` at block ``s // stripes``. Sorting
    first merges slots that are adjacent in a file but not in the request (a
    shuffled free list) into one vectored call, and walks each file forwards.
    The sort is stable: a slot named twice keeps its last buffer last.
    """
    if stripes == 1:
        order = sorted(range(len(ids)), key=ids.__getitem__)
    else:
        span = max(ids, default=0) + 1  # file first, then slot: one int per slot
        places = [slot % stripes * span + slot for slot in ids]
        order = sorted(range(len(ids)), key=places.__getitem__)
    batches: list[tuple[int, list[int]]] = []
    prev = -2 * stripes
    run: list[int] = []
    for pos in order:
        slot = ids[pos]
        if slot == prev + stripes:
            run.append(pos)
        else:
            run = [pos]
            batches.append((slot, run))
        prev = slot
    return batches


def pieces(batches: list[Batch], stripes: int, most: int) -> list[Batch]:
    """``batches`` with every run longer than ``most`` slots cut into runs of at
    most ``most`` (in the same order), each still one call."""
    out: list[Batch] = []
    for slot, positions in batches:
        if len(positions) <= most:
            out.append((slot, positions))
            continue
        for k in range(0, len(positions), most):
            out.append((slot + k * stripes, positions[k : k + most]))
    return out


IOV_MAX = 1024


def vectored(call: Callable[..., int], fd: int, bufs: list[memoryview], offset: int) -> int:
    """``preadv``/``pwritev`` of many buffers at ``offset``, IOV_MAX at a time."""
    if len(bufs) <= IOV_MAX:
        return call(fd, bufs, offset)
    done = 0
    for i in range(0, len(bufs), IOV_MAX):
        chunk = bufs[i : i + IOV_MAX]
        n = call(fd, chunk, offset + done)
        done += n
        if n != sum(len(b) for b in chunk):
            break
    return done


def first_bytes(views: list[memoryview], limit: int) -> list[memoryview]:
    """``views`` cut to their first ``limit`` bytes (all of them for ``limit`` 0)."""
    if limit <= 0:
        return views
    out = []
    for view in views:
        if limit <= 0:
            break
        out.append(view[:limit])
        limit -= len(view)
    return out
