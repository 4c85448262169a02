"""One tier's metadata: block pool, ref counts and events (vLLM ``OffloadingManager`` API).

The protocol, kept exactly as vLLM's ``v1/kv_offload`` defines it:

- ``lookup(keys) -> int``: how many leading keys are present **and ready**.
- ``prepare_store(keys)``: skips keys already present; when the free slots do not
  suffice, evicts idle blocks through the policy, never a key named in the call;
  returns ``None`` (nothing changed) when not enough idle blocks exist. New blocks
  enter at ref ``-1``: not readable, not evictable. One ``removed`` event lists the
  victims.
- ``complete_store(keys, success)``: success makes not-ready keys ready (one
  ``stored`` event); failure removes them and frees their slots. Ready keys are
  left alone.
- ``prepare_load(keys)`` pins each key (ref + 1) and returns the slot ids in key
  order; ``complete_load(keys)`` unpins.
- ``touch(keys)`` updates recency, walking the keys in reverse so the first key
  ends most recently used.

Slot ids: fresh ids ``0..N-1`` in order first, then freed ids, last freed first.
Everything here is synchronous and does no I/O; the policy actor wraps one
manager per tier, and a user's own scheduler may embed one directly.

One state machine, two implementations kept call-for-call equal:

- ``_reference``: the Python manager, the executable reference (its
  ``restore`` / ``restore_index`` in ``_restore``);
- ``_native``: the compiled core (``native/manager_core.c``), each policy behind
  a table of functions mirroring :class:`~kvactors.policy.CachePolicy`
  (``native/policy_*.c``), a user's own policy called back from C;
- ``_contract``: what the Python manager checks in the keys and the policy
  answers it is handed (the compiled core makes the same checks in C);
- ``_checks``: the constructor checks both make; ``_types``: the structs.
"""

from __future__ import annotations

from kvactors.manager._checks import NATIVE, NATIVE_POLICIES
from kvactors.manager._reference import OffloadingManager
from kvactors.manager._types import (
    MAX_BLOCKS,
    LoadStoreSpec,
    ManagerStats,
    OffloadingEvent,
    PrepareStoreOutput,
)

__all__ = [
    "MAX_BLOCKS",
    "NATIVE",
    "NATIVE_POLICIES",
    "LoadStoreSpec",
    "ManagerStats",
    "OffloadingEvent",
    "OffloadingManager",
    "PrepareStoreOutput",
]
