"""The manager on the compiled core: the same contract, its state in C arrays.

The core (``kvactors._manager_core``) checks every call and raises the typed
errors itself; this class only builds vLLM's structs and the events around
its answers. The two calls a scheduler makes most (``lookup``, ``touch``) go
straight to C.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvactors._manager_core import ManagerCore
from kvactors.keys import Key
from kvactors.manager._checks import NATIVE_POLICIES
from kvactors.manager._reference import OffloadingManager
from kvactors.manager._restore import check_index
from kvactors.manager._types import LoadStoreSpec, PrepareStoreOutput
from kvactors.policy import make_policy
from kvactors.policy._base import BlockStatus, CachePolicy

if TYPE_CHECKING:
    from kvactors.media.nvme_index import NVMeIndex

try:
    from kvactors._nvme_index import Table as _IndexTable
except ImportError:  # built without the compiled index: restore_index copies keys
    _IndexTable = None  # type: ignore[misc,assignment]

__all__ = ["NativeManager"]


class NativeManager(OffloadingManager):
    """An :class:`OffloadingManager` on the compiled core (see ``native``)."""

    def _init_state(self, policy: str | CachePolicy) -> None:
        if isinstance(policy, str) and policy not in NATIVE_POLICIES:
            # A known name without a C entry of its own: its Python object, called back.
            policy = make_policy(policy, self.num_blocks)
        self._core = core = ManagerCore(
            self.num_blocks,
            policy,
            block_size=self.block_size,
            medium=self.medium,
            block_type=BlockStatus,
        )
        self._counters = core.counters  # type: ignore[method-assign]
        self.lookup = core.lookup  # type: ignore[method-assign,assignment]
        self.touch = core.touch  # type: ignore[method-assign,assignment]

    @property
    def policy(self) -> CachePolicy | None:
        return self._core.policy

    @property
    def policy_name(self) -> str:
        return self._core.policy_name

    @property
    def native(self) -> bool:
        return True

    @property
    def num_free_blocks(self) -> int:
        return self._core.counters()[1]

    def __len__(self) -> int:
        return len(self._core)

    def __contains__(self, key: object) -> bool:
        return key in self._core

    def get(self, key: Key) -> BlockStatus | None:
        found = self._core.get(key)
        return None if found is None else BlockStatus(found[0], found[1], self.block_size)

    def prepare_store(self, keys: Iterable[Key]) -> PrepareStoreOutput | None:
        out = self._core.prepare_store(keys)
        if out is None:
            return None
        to_store, ids, evicted, evicted_ids = out
        self._event(evicted, True)
        return PrepareStoreOutput(to_store, LoadStoreSpec(ids, self.medium), evicted, evicted_ids)

    def complete_store(self, keys: Iterable[Key], success: bool = True) -> None:
        done = self._core.complete_store(keys, success)
        if success:
            self._event(done, False)

    def prepare_load(self, keys: Iterable[Key]) -> LoadStoreSpec:
        return LoadStoreSpec(self._core.prepare_load(keys), self.medium)

    def complete_load(self, keys: Iterable[Key]) -> None:
        self._core.complete_load(keys)

    def restore(self, blocks: Iterable[tuple[Key, int]]) -> list[Key]:
        return self._core.restore(blocks)

    def restore_index(self, index: NVMeIndex) -> int:
        check_index(index)
        table = index.table
        if _IndexTable is None or not isinstance(table, _IndexTable):
            return super().restore_index(index)
        with index.lock:
            self._core.attach_index(table)  # the keys are read from the table from now on
            restored: int = self._core.restore_index()
        return restored

    def remove(self, keys: Iterable[Key]) -> list[Key]:
        removed = self._core.remove(keys)
        self._event(removed, True)
        return removed
