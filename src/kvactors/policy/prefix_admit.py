"""Prefix admission: which of a request's new blocks to store, and how long each class lives.

A prefix cache only reuses an unbroken run of leading blocks, so a block's
worth depends on where it sits in its request's chain and on what happened
to blocks like it. This policy sorts every block into a **class**, learns
online how often blocks of each class are used again, and uses that for two
decisions:

- **Admission.** :meth:`PrefixAdmitPolicy.admit` sees each ``prepare_store``
  call's keys (one chain, in order) and, when storing them would evict,
  declines the new blocks of a class whose value is below the square of the
  *regret* rate (how often an evicted block is asked for again). The margin
  is deliberate: a declined block that is used again costs a hit for sure,
  while an admitted one costs a hit only if its victim is used again, so
  only classes far below the marginal block are declined (on chat traces, a
  request's last block: its prompt tail, which the next turn does not share).
  Declining cuts the chain there (the blocks behind a declined one could
  never be a leading hit). Declined keys are remembered as ghosts, so a
  class that turns valuable is admitted again.
- **The seen cut.** While it is on, a new key that is no ghost (not
  evicted or declined within the last four capacities of stores) is declined
  too, with the new keys after it. A duel sets it: two miniature copies of
  this policy (``capacity / S`` blocks each, :func:`duel_sample`) replay the
  keys of each ``admit`` call (a ``prepare_store`` with new keys) whose mixed
  hash falls in a ``1/S`` sample, as a request
  (:meth:`PrefixAdmitPolicy.request`), one never cutting, one always; the
  cut is on while the cutting copy's leading hits exceed the other's by more
  than one standard deviation (``gain ** 2 > hits_a + hits_b``, counts
  halved every four miniature capacities of sampled keys).
- **Eviction.** GreedyDual over classes: a block's priority is
  ``H = clock + value(class)`` when stored or touched, the block with the
  lowest ``H`` leaves first and the clock rises to each victim's ``H``. A
  class's blocks therefore stay in proportion to its measured value; with a
  single class this is LRU. Within a class blocks leave in arrival order, and
  a request's new blocks arrive tail first, so a chain loses its leaves
  before its head.

The classes, all from what a manager sees (a call's keys are one chain in
order; ``touch`` is a use):

- a **new** block (stored, never used since) by: whether it is the call's
  last key, whether the call's leading keys were present (it extends a cached
  prefix), and the call's length on a log scale (1, 2-7, 8-31, 32+ keys);
- a **reused** block by its number of uses since stored: 1, 2, 3 or more.

A key asked for while it is a ghost (below) is remembered until a later
``touch`` finds ghosts of its own; stored again, it enters the reused class its use would have moved
it to had it stayed, when that class is worth more than its new class (not
for a call's last key): a block's frequency outlives its eviction, as ARC
moves a ghost hit to its frequency list. A new key that is a ghost of any age
(not a call's last key) stored right behind a reused block (the call's
previous key, held or admitted by the same call) then takes that block's
class when it is worth more: the chain it continues is in use again.

``value(class)`` is ``uses / births``: a birth is a block stored (or
declined) in the class, or a use moving it there; a use is a touch of a
block of the class, resident or a ghost (a key evicted or declined while
fewer than ``capacity`` blocks have been stored since; an older ghost, asked
for ``age`` stores after it left, counts ``capacity / age`` of a use). Both
counts start at a neutral prior and
halve when ``births`` passes four times the capacity, so the values follow a
changing workload within a few turnovers of the tier. The regret rate is
ghost hits of evicted keys over evictions, halved the same way. The ghost
window is measured in stores, not in ghosts, so declined and evicted keys get
the same horizon (one turnover of the tier) however many keys are declined;
ghosts are kept for four capacities of stores, at most ``4 * capacity`` of
them (the oldest go first), an older one than the horizon marking its key
as seen, neither a regret nor a key that re-enters as a reused block. Nothing is
fitted to a trace: every knob is a ratio measured on the running workload
or a multiple of the tier's own capacity.

The classes and what is learned of them (values, regret, ghosts) are in
:mod:`kvactors.policy.prefix_values`; this module decides admission, the duel
and eviction.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Container, Iterable, Iterator, Sequence
from typing import ClassVar

from kvactors.keys import Key
from kvactors.policy._base import BlockStatus, HeldKeys, checked_capacity
from kvactors.policy.prefix_values import CLASSES, NEW_CLASSES, ClassValues, new_class, promoted

__all__ = ["CLASSES", "NEW_CLASSES", "PrefixAdmitPolicy", "new_class"]

DUEL_SAMPLE = 32
"""The duel's miniature caches see one key in (at most) this many, by hash, as
set dueling samples 32 leader sets of a processor cache."""
DUEL_BLOCKS = 1024
"""...but each miniature holds at least this many blocks (the sample shrinks on
small tiers; below ``DUEL_BLOCKS`` blocks it is every key at full size)."""
_M64 = (1 << 64) - 1


def key_mix(key: Key) -> int:
    """The 32-bit mix of ``key``'s hash the compiled core also uses (murmur3's finalizer)."""
    x = hash(key) & _M64
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _M64
    x ^= x >> 33
    return x & 0xFFFFFFFF


def duel_sample(capacity: int) -> int:
    """One key in how many the duel's miniatures see: a power of two, at most
    :data:`DUEL_SAMPLE`, leaving each at least :data:`DUEL_BLOCKS` blocks (1 on
    small tiers)."""
    sample = DUEL_SAMPLE
    while sample > 1 and capacity // sample < DUEL_BLOCKS:
        sample //= 2
    return sample


_READY = BlockStatus(0, 0, 1)
"""The one block status of a miniature's blocks: ready, never pinned."""


class PrefixAdmitPolicy(ClassValues, HeldKeys):
    """Prefix-aware admission with class-valued GreedyDual eviction (see the module).

    - ``admit(keys, new)`` returns the leading part of ``new`` worth storing.
    - ``insert`` gives a key the class ``admit`` chose (class 0 when
      ``admit`` was not called, as for ``restore``).
    - ``insert_many`` (one call's keys, in chain order) inserts them tail
      first, each with ``H = clock + value``.
    - ``touch`` walks the keys in reverse: a ready resident key counts a use
      of its class and moves to the next reused class, with
      ``H = clock + value``; a ghost counts a use of the class it left.
      Blocks still being written are not touched.
    - ``evict(n)`` merges the class lists by ``H`` (lowest first, list order
      on ties), skipping pinned, being-written and protected blocks.
    """

    name: ClassVar[str] = "prefix_admit"

    def __init__(self, capacity: int, *, duel: bool = True, cut: bool = False) -> None:
        """Raises :class:`~kvactors.errors.ConfigError` for a ``capacity`` that is
        not an ``int >= 1``."""
        super().__init__(checked_capacity(capacity, 1))
        self.clock = 0.0
        self.lists: list[OrderedDict[Key, float]] = [OrderedDict() for _ in range(CLASSES)]
        self._blocks: dict[Key, BlockStatus] = {}
        self._class: dict[Key, int] = {}
        self._chosen: dict[Key, int] = {}  # admitted, not yet inserted
        # The keys the last touch that found any found as ghosts within the window,
        # and the class each would have moved to had it stayed (see admit). A
        # touch finding none (a served load touching its hits) keeps them.
        self._returning: dict[Key, int] = {}
        self.get = self._blocks.get
        # The seen cut: while on, a new key that is no ghost (not seen among the
        # last keys evicted or declined) is declined, with every new key after it.
        self.cut = cut
        # The duel: two miniature copies of this policy on a hash sample of the
        # keys, one never cutting, one always; the cut follows the one with more
        # (leading) hits, by more than one standard deviation.
        self._minis: tuple[PrefixAdmitPolicy, PrefixAdmitPolicy] | None = None
        self._sample_below = 0
        self.duel_hits = [0.0, 0.0]
        self.duel_keys = 0.0
        if duel:
            sample = duel_sample(capacity)
            mini = max(1, capacity // sample)
            self._minis = (
                PrefixAdmitPolicy(mini, duel=False),
                PrefixAdmitPolicy(mini, duel=False, cut=True),
            )
            self._sample_below = (1 << 32) // sample

    # -- the CachePolicy protocol ----------------------------------------------

    def admit(self, keys: Sequence[Key], new: Sequence[Key]) -> list[Key]:
        """The leading keys of ``new`` (the keys of ``keys`` not held, in order) to store.

        A new key whose class is worth less than ``regret ** 2``, or while
        the seen cut is on a key that is no ghost, is declined, with every
        new key after it, but only when storing all of ``new`` would evict: a
        tier with room stores everything.
        """
        # Only this call's admitted keys wait for insert_many: a call that then
        # found no idle blocks to evict leaves none behind for good.
        self._chosen.clear()
        if not new:
            return []
        if self._minis is not None:  # the miniatures see the call first
            self._duel(keys)
        blocks = self._blocks
        length = len(keys)
        extends = bool(length) and keys[0] in blocks
        full = len(blocks) + len(new) > self.capacity
        regret = self.regret
        bar = regret * regret
        chosen = self._chosen
        admitted: list[Key] = []
        declined = False
        pending = iter(new)
        want: Key | None = next(pending)
        returning = self._returning
        classes = self._class
        value = self.value
        cut = self.cut
        for position, key in enumerate(keys):
            if key != want:
                continue
            cls = new_class(position, length, extends)
            back = self._ghost_hit(key)
            if back is None:
                back = returning.get(key)
            # A key back within the window (evicted or declined) re-enters as the
            # reused block it would have been, if that class is worth more (not a
            # call's last key).
            if (
                back is not None
                and back >= 0
                and position != length - 1
                and value(back) > value(cls)
            ):
                cls = back
            # A ghost (of any age) right behind a reused block, held or admitted
            # by this call, takes that block's class if it is worth more (not a
            # call's last key): the chain it continues is in use again.
            if back is not None and position and position != length - 1:
                parent = keys[position - 1]
                above = classes.get(parent)
                if above is None:
                    above = chosen.get(parent)
                if above is not None and above >= NEW_CLASSES and value(above) > value(cls):
                    cls = above
            self._born(cls)
            if not declined and full and (value(cls) < bar or (cut and back is None)):
                declined = True
            if declined:
                self._ghost(key, -1 - cls)
            else:
                chosen[key] = cls
                admitted.append(key)
            want = next(pending, None)
            if want is None:
                break
        return admitted

    def _put(self, key: Key, block: BlockStatus, cls: int, prio: float) -> None:
        self._blocks[key] = block
        self._class[key] = cls
        self.lists[cls][key] = prio

    def insert(self, key: Key, block: BlockStatus) -> None:
        self.stored += 1
        cls = self._chosen.pop(key, 0)
        self._put(key, block, cls, self.clock + self.value(cls))

    def insert_many(self, items: Iterable[tuple[Key, BlockStatus]]) -> None:
        # One call's keys in chain order: the tail enters its class list first,
        # so within a class a chain loses its leaves before its head.
        for key, block in reversed(list(items)):
            self.insert(key, block)

    def remove(self, key: Key) -> None:
        del self._blocks[key]
        del self.lists[self._class.pop(key)][key]

    def touch(self, keys: Sequence[Key]) -> None:
        blocks = self._blocks
        classes = self._class
        lists = self.lists
        returning: dict[Key, int] | None = None
        for key in reversed(keys):
            block = blocks.get(key)
            if block is None:
                if key in self.ghosts:
                    back = self._ghost_hit(key)
                    if back is not None:
                        if returning is None:  # this call's keys replace the last ones
                            self._returning = returning = {}
                        returning[key] = back
                continue
            if block.ref_cnt < 0:
                continue  # just stored, not yet written: not a use
            cls = classes[key]
            del lists[cls][key]
            self.uses[cls] += 1.0
            cls = promoted(cls)
            self._born(cls)
            classes[key] = cls
            lists[cls][key] = self.clock + self.value(cls)

    def _duel(self, keys: Sequence[Key]) -> None:
        """Run the sampled keys of ``keys`` through both miniatures as a
        request, and set the cut from their hits."""
        assert self._minis is not None
        below = self._sample_below
        sampled = [key for key in keys if key_mix(key) < below]
        if not sampled or len(set(sampled)) < len(sampled):
            return  # a key named twice is no request
        hits = self.duel_hits
        for side, mini in enumerate(self._minis):
            hits[side] += mini.request(sampled)
        self.duel_keys += len(sampled)
        if self.duel_keys > self.window * self._minis[0].capacity:
            self.duel_keys *= 0.5
            hits[0] *= 0.5
            hits[1] *= 0.5
        gain = hits[1] - hits[0]
        self.cut = gain > 0.0 and gain * gain > hits[0] + hits[1]

    def request(self, keys: Sequence[Key]) -> int:
        """A bare manager's handshake for one request of distinct ``keys`` on
        this policy alone (the duel's miniatures): the leading keys held, then
        ``touch``, ``admit``, ``evict`` and ``insert_many`` of what is stored,
        ready at once. Returns the leading hits."""
        blocks = self._blocks
        hits = 0
        for key in keys:
            if key not in blocks:
                break
            hits += 1
        self.touch(keys)
        new = [key for key in keys if key not in blocks]
        if new:
            admitted = self.admit(keys, new)
            need = len(blocks) + len(admitted) - self.capacity
            if admitted and (need <= 0 or self.evict(need, set(keys)) is not None):
                self.insert_many([(key, _READY) for key in admitted])
        return hits

    def evict(self, n: int, protected: Container[Key]) -> list[tuple[Key, BlockStatus]] | None:
        if n <= 0:
            return []
        blocks = self._blocks

        def eligible(cls: int) -> Iterator[tuple[float, int, Key]]:
            for key, prio in self.lists[cls].items():
                if blocks[key].ref_cnt == 0 and key not in protected:
                    yield prio, cls, key

        sources = [eligible(cls) for cls in range(CLASSES) if self.lists[cls]]
        picks: list[tuple[float, int, Key]] = []
        for _, pick in zip(range(n), heapq.merge(*sources)):
            picks.append(pick)
        if len(picks) < n:
            return None
        victims: list[tuple[Key, BlockStatus]] = []
        for prio, cls, key in picks:
            del self.lists[cls][key]
            del self._class[key]
            victims.append((key, blocks.pop(key)))
            self.clock = max(self.clock, prio)
            self._ghost(key, cls)
        self.evictions += n
        if self.evictions > self.window * self.capacity:
            self.evictions *= 0.5
            self.regrets *= 0.5
        return victims

    def order_state(self) -> tuple[object, ...]:
        """Everything that decides the next answers: ``("prefix_admit", clock,
        stored, evictions, regrets, births, uses, lists, ghosts, chosen, returning,
        cut, duel)``, the lists as ``(key, priority)`` pairs in order, the ghosts as
        ``(key, tag, stored then)`` oldest first, ``returning`` as ``{key: class}``
        (-1: an older ghost) and ``duel`` as ``(hits without the cut, hits with it,
        sampled keys, each miniature's order_state())``, ``None`` in a miniature
        (compared with the compiled core)."""
        return (
            "prefix_admit",
            self.clock,
            self.stored,
            self.evictions,
            self.regrets,
            tuple(self.births),
            tuple(self.uses),
            tuple(tuple(lst.items()) for lst in self.lists),
            tuple((key, tag, since) for key, (tag, since) in self.ghosts.items()),
            dict(self._chosen),
            dict(self._returning),
            self.cut,
            None
            if self._minis is None
            else (
                self.duel_hits[0],
                self.duel_hits[1],
                self.duel_keys,
                self._minis[0].order_state(),
                self._minis[1].order_state(),
            ),
        )
