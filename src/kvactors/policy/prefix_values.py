"""What prefix admission learns: the classes of blocks
(:func:`new_class`, :func:`promoted`), each class's value (uses per birth), the
regret rate of evictions and the ghosts of keys evicted or declined, with the
halving that keeps them recent.

:class:`ClassValues` is that part of
:class:`~kvactors.policy.prefix_admit.PrefixAdmitPolicy` (a base); the module
docstring of :mod:`kvactors.policy.prefix_admit` gives the rules.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

from kvactors.keys import Key

__all__ = [
    "CLASSES",
    "GHOSTS",
    "NEW_CLASSES",
    "PRIOR_BIRTHS",
    "PRIOR_USES",
    "REUSED_CLASSES",
    "ClassValues",
    "new_class",
    "promoted",
]

NEW_CLASSES = 16
"""Classes of new blocks: not the call's last key (bit 0), extends a present prefix
(bit 1), length bucket (bits 2-3). A last key's class sorts first, so on equal
priority a chain's last block leaves before its other blocks."""
REUSED_CLASSES = 3
"""Classes of reused blocks: used once, twice, three times or more since stored."""
CLASSES = NEW_CLASSES + REUSED_CLASSES

PRIOR_BIRTHS = 1.0
PRIOR_USES = 0.5
"""Each class starts at value 0.5: neither favoured nor starved before any feedback."""
GHOSTS = 4
"""At most this many capacities of ghosts are kept, each for at most this many
capacities of stores (the window in which a ghost's use counts whole is one
capacity of stores; an older ghost's use counts ``capacity / age``, and it says
the key was seen, for the seen cut)."""


def new_class(position: int, length: int, extends: bool) -> int:
    """The class of a new block at ``position`` of a call of ``length`` keys."""
    bucket = min(length.bit_length() // 2, 3)  # 1 | 2-7 | 8-31 | 32+ keys
    return (position != length - 1) | (extends << 1) | (bucket << 2)


def promoted(cls: int) -> int:
    """The class a block moves to when it is used."""
    return NEW_CLASSES if cls < NEW_CLASSES else min(cls + 1, CLASSES - 1)


class ClassValues:
    """Per-class births and uses, evictions and their regrets, and the ghosts,
    for a tier of ``capacity`` blocks."""

    window: ClassVar[float] = 4.0
    """Counts halve after this many capacities' worth of births (or evictions)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.births = [PRIOR_BIRTHS] * CLASSES
        self.uses = [PRIOR_USES] * CLASSES
        self.evictions = PRIOR_BIRTHS
        self.regrets = 0.0
        self.stored = 0  # blocks inserted so far: the ghost window's clock
        # key -> (class of an evicted key, or -1 - class of a declined one; ``stored``
        # when it left), oldest first.
        self.ghosts: OrderedDict[Key, tuple[int, int]] = OrderedDict()

    # -- what is learned -------------------------------------------------------

    def value(self, cls: int) -> float:
        """Uses per birth of class ``cls``: how often such a block is used again."""
        return self.uses[cls] / self.births[cls]

    @property
    def regret(self) -> float:
        """Ghost hits of evicted keys per eviction: what an eviction costs."""
        return self.regrets / self.evictions

    def _born(self, cls: int) -> None:
        births = self.births[cls] + 1.0
        if births > self.window * self.capacity:
            births *= 0.5
            self.uses[cls] *= 0.5
        self.births[cls] = births

    def _ghost(self, key: Key, tag: int) -> None:
        ghosts = self.ghosts
        ghosts.pop(key, None)
        ghosts[key] = (tag, self.stored)
        horizon = self.stored - GHOSTS * self.capacity
        limit = GHOSTS * self.capacity
        while len(ghosts) > limit or next(iter(ghosts.values()))[1] < horizon:
            ghosts.popitem(last=False)

    def _ghost_hit(self, key: Key) -> int | None:
        """Forget ``key``'s ghost and count its use; a key asked for within the
        window returns the class its use would have moved it to, had it stayed,
        an older ghost ``-1`` (seen; its use counts ``capacity / age``, no
        regret), no ghost ``None``."""
        entry = self.ghosts.pop(key, None)
        if entry is None:
            return None
        tag, since = entry
        age = self.stored - since
        if age > self.capacity:  # left more than a turnover of the tier ago
            if age <= GHOSTS * self.capacity:
                # The share of a use a block of the class would have bought per
                # turnover of residence: 1 within the window, capacity / age after.
                self.uses[-1 - tag if tag < 0 else tag] += self.capacity / age
            return -1
        if tag < 0:
            tag = -1 - tag
        else:
            self.regrets += 1.0
        self.uses[tag] += 1.0
        return promoted(tag)
