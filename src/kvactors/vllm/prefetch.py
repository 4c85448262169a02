"""Prefetch from vLLM's lookups: the scheduler asks the workers to read NVMe blocks
into the CPU tier before vLLM loads them, without vLLM (no vLLM import here).

vLLM 0.32's ``OffloadingConnector`` sends the workers nothing but transfer jobs,
and a job exists only once vLLM loads or stores a request's blocks. Its own
tiered manager (``vllm/v1/kv_offload/tiering``) therefore does secondary-tier
I/O in the scheduler process, into a CPU pool shared with the workers through
a file in ``/dev/shm``. kvactors keeps the bytes and the NVMe files in the
workers and shares only a small control file: a :class:`Mailbox`, a ring of
moves the scheduler posts and every worker carries out in order, each writing
back one status per move.

- :class:`Prefetcher` (scheduler): a lookup of a block held only by the NVMe
  tier reserves a CPU slot (demoting its victim), pins the NVMe copy and posts
  the moves; the lookup answers ``HIT_PENDING`` and vLLM asks again on a later
  step. When every worker has reported the move, the CPU copy becomes
  readable (the next lookup answers ``HIT``) or, on a failed read, is
  forgotten, and so is the NVMe copy that failed its checksum.
- :class:`MailboxReader` (each worker): :class:`~kvactors.vllm.mover.BlockMover`
  polls it on its thread and runs the moves with its pool and files.
- The remote tier uses the same path: a lookup of a block no local tier holds
  but the remote store has reserves a CPU slot and posts a :data:`FETCH`.

The metadata that protects slots (reference counts of both tiers) is the same
as for moves carried in jobs, so moves and jobs may run in either order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from kvactors.errors import ConfigError
from kvactors.keys import Key
from kvactors.vllm.tiers import TieredManager

__all__ = [
    "DEMOTE",
    "FETCH",
    "PROMOTE",
    "Mailbox",
    "MailboxReader",
    "Move",
    "Prefetcher",
    "mailbox_path",
]

DEMOTE = 1
"""A move CPU slot -> NVMe slot (a victim of the slot a promotion reuses)."""
PROMOTE = 2
"""A move NVMe slot -> CPU slot, checked against the key's checksum."""
FETCH = 3
"""A move remote store -> CPU slot (the value's header and hash checked)."""

_MAGIC = 0x6B76616374727331  # "kvactrs1"
_KEY_BYTES = 64
_HEADER = 16  # int64 words: magic, capacity, world, head, joined[0..world] follows
_OPEN_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class Move:
    seq: int
    op: int
    cpu_slot: int
    nvme_slot: int
    key: Key


def mailbox_path(engine_id: str) -> Path:
    """The control file of the engine ``engine_id`` (``/dev/shm`` where it exists)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", engine_id)
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"kvactors-vllm-{safe}.ctl"


class Mailbox:
    """A ring of ``capacity`` moves in a shared file: one writer (the scheduler, party
    ``-1``), ``world`` readers (the workers, parties ``0..world-1``).

    Whoever opens the file first creates it; the others wait for it (up to two
    minutes). Once every party has mapped it, the file is unlinked (the mappings
    stay), so no exit path leaves it behind after start-up.
    """

    def __init__(self, path: str | Path, world: int, party: int, capacity: int = 4096) -> None:
        if world < 1 or capacity < 1 or not -1 <= party < world:
            raise ConfigError(f"mailbox: bad world {world} / party {party} / capacity {capacity}")
        self.path = Path(path)
        self.world = world
        self.party = party
        self.capacity = capacity
        words = _HEADER + world + 1 + world  # header, joined flags, done counters
        moves = capacity * 4 * 8
        keys = capacity * _KEY_BYTES
        status = world * capacity
        size = words * 8 + moves + keys + status
        creator = False
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            creator = True
            os.ftruncate(fd, size)
        except FileExistsError:
            fd = os.open(self.path, os.O_RDWR)
            deadline = time.monotonic() + _OPEN_TIMEOUT
            while os.fstat(fd).st_size < size:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ConfigError(
                        f"mailbox {self.path}: not created within {_OPEN_TIMEOUT} s"
                    ) from None
                time.sleep(0.005)
        try:
            self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        buf = np.frombuffer(self._mm, dtype=np.uint8)
        off = 0
        self._words = buf[off : off + words * 8].view(np.int64)
        off += words * 8
        self._moves = buf[off : off + moves].view(np.int64).reshape(capacity, 4)
        off += moves
        self._keys = buf[off : off + keys].reshape(capacity, _KEY_BYTES)
        off += keys
        self._status = buf[off : off + status].reshape(world, capacity)
        self._joined = self._words[_HEADER : _HEADER + world + 1]
        self._done = self._words[_HEADER + world + 1 :]
        if creator:
            self._words[1] = capacity
            self._words[2] = world
            self._words[0] = _MAGIC
        else:
            deadline = time.monotonic() + _OPEN_TIMEOUT
            while int(self._words[0]) != _MAGIC:
                if time.monotonic() > deadline:
                    raise ConfigError(f"mailbox {self.path}: never initialised")
                time.sleep(0.005)
            if int(self._words[1]) != capacity or int(self._words[2]) != world:
                raise ConfigError(
                    f"mailbox {self.path}: made for {int(self._words[2])} workers and "
                    f"{int(self._words[1])} moves, this party expects {world} and {capacity}"
                )
        self._unlinked = False
        self._joined[party + 1] = 1
        self.unlink_when_joined()

    def unlink_when_joined(self) -> bool:
        """Remove the file's name once every party has mapped it; True once removed."""
        if self._unlinked:
            return True
        if not bool(np.all(self._joined == 1)):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._unlinked = True
        return True

    # -- the scheduler ----------------------------------------------------------------

    @property
    def head(self) -> int:
        return int(self._words[3])

    def completed(self) -> int:
        """Moves every worker has carried out (a prefix of the ring's history)."""
        return int(self._done.min())

    def room(self) -> int:
        return self.capacity - (self.head - self.completed())

    def post(self, moves: list[tuple[int, int, int, Key]]) -> list[int]:
        """Append ``(op, cpu_slot, nvme_slot, key)`` moves; returns their sequence numbers.
        The caller checks :meth:`room` and key lengths first (an int key is
        stored as 8 bytes, length ``-1``)."""
        head = self.head
        if len(moves) > self.room():
            raise ConfigError(f"mailbox: {len(moves)} moves, room for {self.room()}")
        seqs = []
        for i, (op, cpu_slot, nvme_slot, key) in enumerate(moves):
            seq = head + i
            pos = seq % self.capacity
            raw = key if isinstance(key, bytes) else key.to_bytes(8, "little", signed=True)
            self._moves[pos] = (op, cpu_slot, nvme_slot, len(raw) if raw is key else -1)
            self._keys[pos, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            self._status[:, pos] = 0
            seqs.append(seq)
        self._words[3] = head + len(moves)  # published after the moves themselves
        return seqs

    def outcome(self, seq: int) -> bool:
        """Whether every worker carried out move ``seq`` (call once it is completed)."""
        return bool(np.all(self._status[:, seq % self.capacity] == 1))

    # -- the workers --------------------------------------------------------------------

    def done_by(self, rank: int) -> int:
        return int(self._done[rank])

    def read(self, seq: int) -> Move:
        pos = seq % self.capacity
        op, cpu_slot, nvme_slot, klen = (int(v) for v in self._moves[pos])
        if klen < 0:
            raw = bytes(self._keys[pos, :8])
            return Move(seq, op, cpu_slot, nvme_slot, int.from_bytes(raw, "little", signed=True))
        return Move(seq, op, cpu_slot, nvme_slot, bytes(self._keys[pos, :klen]))

    def report(self, rank: int, moves: list[Move], ok: list[bool]) -> None:
        """Worker ``rank`` carried out ``moves`` (the next ones in order)."""
        for move, good in zip(moves, ok):
            self._status[rank, move.seq % self.capacity] = 1 if good else 2
        if moves:
            self._done[rank] = moves[-1].seq + 1  # published after the statuses

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._mm.close()


class MailboxReader:
    """A worker's side of a :class:`Mailbox`: the moves it has not carried out yet."""

    def __init__(self, mailbox: Mailbox, rank: int) -> None:
        self.mailbox = mailbox
        self.rank = rank

    def take(self) -> list[Move]:
        box = self.mailbox
        box.unlink_when_joined()
        return [box.read(seq) for seq in range(box.done_by(self.rank), box.head)]

    def report(self, moves: list[Move], ok: list[bool]) -> None:
        self.mailbox.report(self.rank, moves, ok)

    def close(self) -> None:
        self.mailbox.close()


@dataclasses.dataclass
class _Posted:
    op: int
    key: Key


class Prefetcher:
    """The scheduler's side: starts prefetches of NVMe-only blocks and completes them."""

    def __init__(self, tiers: TieredManager, mailbox: Mailbox, nvme: bool = True) -> None:
        self.tiers = tiers
        self.mailbox = mailbox
        self.nvme = nvme  # False: remote fetches only (prefetch off)
        self._posted: dict[int, _Posted] = {}
        self._collected = mailbox.head

    @property
    def in_flight(self) -> int:
        return len(self._posted)

    def start(self, key: Key, from_remote: bool = False) -> bool:
        """Start reading ``key`` (held only by NVMe, or ``from_remote``: by no local
        tier) into a CPU slot; False when it cannot (nothing to read, no CPU slot,
        the ring full, a key over 64 bytes: vLLM's are 36). Raises
        :class:`ConfigError` when a victim's key is over 64 bytes."""
        if (isinstance(key, bytes) and len(key) > _KEY_BYTES) or self.mailbox.room() < 2:
            return False
        if not (from_remote or self.nvme):
            return False
        plan = self.tiers.start_prefetch(key, from_remote)
        if plan is None:
            return False
        if any(isinstance(k, bytes) and len(k) > _KEY_BYTES for k in plan.demote.keys):
            raise ConfigError(f"prefetch: a key longer than {_KEY_BYTES} bytes")
        moves: list[tuple[int, int, int, Key]] = [
            (DEMOTE, c, n, k)
            for c, n, k in zip(plan.demote.cpu_slots, plan.demote.nvme_slots, plan.demote.keys)
        ]
        moves.append((FETCH if from_remote else PROMOTE, plan.cpu_slot, plan.nvme_slot, key))
        for seq, (op, _, _, k) in zip(self.mailbox.post(moves), moves):
            self._posted[seq] = _Posted(op, k)
        return True

    def poll(self) -> int:
        """Complete the moves every worker has carried out; returns how many."""
        done = self.mailbox.completed()
        n = 0
        while self._collected < done:
            seq = self._collected
            self._collected += 1
            posted = self._posted.pop(seq, None)
            if posted is None:  # posted before a reset
                continue
            ok = self.mailbox.outcome(seq)
            if posted.op == DEMOTE:
                self.tiers.complete_demotion(posted.key, ok)
            else:
                self.tiers.complete_prefetch(posted.key, ok)
            n += 1
        return n

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until every posted move is carried out (False: ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while self._posted:
            self.poll()
            if not self._posted:
                break
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def forget(self) -> None:
        """After :meth:`TieredManager.reset`: outcomes of moves posted before are ignored."""
        self._posted.clear()

    def close(self) -> None:
        self.mailbox.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.mailbox.path)
