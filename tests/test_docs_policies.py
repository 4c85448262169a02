"""docs/policies.md's promises held to the code, on both manager cores: the
figures table is what `kvactors replay` prints, a user's own policy is told
what the page says in the order it says, broken answers raise PolicyError,
`weighted_lru` with both weights 0 is LRU, and a declined store is seen by
callers as the page describes."""

from __future__ import annotations

import json
import re
from collections.abc import Container, Sequence
from typing import ClassVar

import anyio
import pytest

import kvactors
from _docs import DOCS, doc_table
from _policies import RecordingFIFO
from kvactors import OffloadingManager, manager
from kvactors.cli import main
from kvactors.errors import ConfigError, PolicyError
from kvactors.keys import Key
from kvactors.policy import (
    POLICIES,
    ARCPolicy,
    BlockStatus,
    LRUPolicy,
    PrefixAdmitPolicy,
    WeightedLRUPolicy,
    make_policy,
)

POLICIES_MD = DOCS / "policies.md"
CORES = [pytest.param(True, id="compiled"), pytest.param(False, id="python")]
needs_native = pytest.mark.skipif(not manager.NATIVE, reason="compiled core not built")


def test_the_policy_table_names_every_built_in_policy() -> None:
    rows = doc_table(POLICIES_MD, "| policy | in one line | pick it when |")
    assert {re.sub(r"[` ]|\(default\)", "", row[0]) for row in rows} == set(POLICIES)
    assert kvactors.Config().cpu.policy == "lru"  # "`lru` (default)"


# --- What every built-in policy does ----------------------------------------------


def _order_state(mgr: OffloadingManager) -> tuple[object, ...]:
    """The policy's order data: the compiled core's report, or the Python policy's."""
    if mgr.native:
        return mgr._core.policy_state()  # type: ignore[attr-defined,no-any-return]
    return mgr.policy.order_state()  # type: ignore[union-attr,no-any-return]


def _blocks(mgr: OffloadingManager, keys: range) -> list[tuple[int, int] | None]:
    return [None if (b := mgr.get(k)) is None else (b.block_id, b.ref_cnt) for k in keys]


@pytest.mark.parametrize("native", CORES)
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_never_evicts_a_held_block_and_evicts_atomically(
    name: str, native: bool
) -> None:
    """The page's two promises for every built-in policy, on both cores: no victim
    is pinned, being written or named in the same prepare_store; a prepare_store
    that cannot find all the room it needs returns None and evicts nothing: every
    block, its slot and ref count, and the policy's eviction order stay as they
    were (prefix_admit's learned counts, ghosts and duel, which its admit updates
    before the eviction, may change; the order of its resident blocks does not)."""
    if native and not manager.NATIVE:
        pytest.skip("compiled core not built")
    import random

    rnd = random.Random(3)
    keys_in_use = range(40)
    mgr = OffloadingManager(8, block_size=1, policy=name, native=native)
    pins: list[int] = []
    writing: list[int] = []
    refused = evicted = 0
    for _ in range(3000):
        keys = list(dict.fromkeys(rnd.randrange(40) for _ in range(rnd.randrange(1, 7))))
        mgr.touch(keys)
        before = (_order_state(mgr), _blocks(mgr, keys_in_use), mgr.stats().evictions)
        out = mgr.prepare_store(keys)
        if out is None:
            refused += 1
            after = (_order_state(mgr), _blocks(mgr, keys_in_use), mgr.stats().evictions)
            if name == "prefix_admit":  # clock, stored, evictions and the lists
                before = (before[0][1:4] + before[0][7:8], *before[1:])
                after = (after[0][1:4] + after[0][7:8], *after[1:])
            assert after == before
        else:
            victims = set(out.block_hashes_evicted)
            assert not victims & set(keys)
            assert not victims & set(pins)
            assert not victims & set(writing)
            evicted += len(victims)
            if rnd.random() < 0.3:  # in flight (ref -1) until a later step
                writing.extend(out.block_hashes_to_store)
            elif out.block_hashes_to_store:
                mgr.complete_store(out.block_hashes_to_store, success=rnd.random() < 0.9)
        if writing and rnd.random() < 0.4:
            mgr.complete_store(writing)
            writing.clear()
        ready = [k for k in keys_in_use if (b := mgr.get(k)) is not None and b.ref_cnt >= 0]
        if ready and rnd.random() < 0.3:
            key = rnd.choice(ready)
            mgr.prepare_load([key])
            pins.append(key)
        if pins and rnd.random() < 0.3:
            mgr.complete_load([pins.pop(rnd.randrange(len(pins)))])
    assert refused > 100
    assert evicted > 100


# --- Figures on the bundled traces ----------------------------------------------


def _ratio_and_gap(cell: str) -> tuple[str, str | None]:
    found = re.fullmatch(r"([0-9.]+)(?: \(([+-]?[0-9.]+)%\))?", cell)
    assert found is not None, cell
    return found.group(1), found.group(2)


def test_the_figures_table_is_what_replay_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """Every cell of 'Figures on the bundled traces': the tier's blocks, each
    policy's hit ratio and share of the LRU -> MIN gap, and MIN, from
    `kvactors replay TRACE --capacity F --json`."""
    header = "| trace | capacity | blocks | lru | arc | weighted_lru | prefix_admit | MIN |"
    rows = doc_table(POLICIES_MD, header)
    assert len(rows) == 6
    names = ["lru", "arc", "weighted_lru", "prefix_admit"]
    for row in rows:
        trace, capacity, blocks = row[0], row[1], int(row[2].replace(",", ""))
        assert main(["replay", trace, "--capacity", capacity, "--json"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]
        assert summary["capacity_blocks"] == blocks, row
        for name, cell in zip(names, row[3:7]):
            ratio, gap = _ratio_and_gap(cell)
            got = summary["policies"][name]
            assert f"{got['hit_ratio']:.4f}" == ratio, (row, name)
            if gap is not None:
                assert f"{100 * got['of_gap']:+.1f}" == gap, (row, name)
        assert f"{summary['belady']['hit_ratio']:.4f}" == row[7], row


# --- Your own policy --------------------------------------------------------------


@pytest.mark.parametrize("native", CORES)
def test_a_users_policy_is_told_what_the_page_says_in_that_order(native: bool) -> None:
    """insert_many once per prepare_store with the new keys (ref -1, the manager's
    block_size), after any evict(n, protected = the call's keys); remove for a
    failed store's keys and for remove's idle keys; touch with every key of the
    call, absent ones included; insert per key restore loads (ref 0)."""
    if native and not manager.NATIVE:
        pytest.skip("compiled core not built")
    policy = RecordingFIFO()
    mgr = OffloadingManager(3, block_size=16, policy=policy, native=native)
    out = mgr.prepare_store([1, 2])
    assert out is not None
    mgr.complete_store([1, 2])
    out = mgr.prepare_store([2, 3, 4])  # 2 present, one slot short: 1 is evicted
    assert out is not None
    assert out.block_hashes_evicted == [1]
    mgr.complete_store([3], success=False)
    mgr.complete_store([4])
    mgr.touch([9, 2, 4])
    mgr.remove([2])
    assert policy.calls == [
        ("insert_many", [(1, 0, -1, 16), (2, 1, -1, 16)]),
        ("evict", 1, [1], [2]),  # 2 is named by the call: protected
        ("insert_many", [(3, 2, -1, 16), (4, 0, -1, 16)]),  # 4 takes 1's slot
        ("remove", 3),
        ("touch", [9, 2, 4]),
        ("remove", 2),
    ]
    assert [b.ref_cnt for b in policy.blocks.values()] == [0]  # kept current
    restored = RecordingFIFO()
    fresh = OffloadingManager(4, block_size=8, policy=restored, native=native)
    assert fresh.restore([(5, 0), (6, 2)]) == [5, 6]
    assert restored.calls == [("insert", 5, 0, 0, 8), ("insert", 6, 2, 0, 8)]


class Breaking(RecordingFIFO):
    """Answers evict in one of the ways the page forbids."""

    name: ClassVar[str] = "breaking"

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def evict(self, n: int, protected: Container[Key]) -> list[tuple[Key, BlockStatus]] | None:
        keys = list(self.blocks)
        if self.how == "too few":
            chosen = keys[: n - 1]
        elif self.how == "too many":
            chosen = keys[: n + 1]
        elif self.how == "protected":
            chosen = [k for k in keys if k in protected][:n]
        else:  # "pinned"
            chosen = [k for k in keys if self.blocks[k].ref_cnt != 0][:n]
        return [(k, self.blocks.pop(k)) for k in chosen]


@pytest.mark.parametrize("native", CORES)
@pytest.mark.parametrize("how", ["too few", "too many", "protected", "pinned"])
def test_an_evict_answer_that_breaks_the_contract_raises_policy_error(
    native: bool, how: str
) -> None:
    """ "evict must return exactly n (key, block) victims ..., never a block whose
    ref_cnt is not 0 nor a key in protected; an answer that breaks this raises
    PolicyError"."""
    if native and not manager.NATIVE:
        pytest.skip("compiled core not built")
    mgr = OffloadingManager(2, block_size=1, policy=Breaking(how), native=native)
    out = mgr.prepare_store([1, 2])
    assert out is not None
    mgr.complete_store([1, 2])
    if how == "pinned":
        mgr.prepare_load([1])
    with pytest.raises(PolicyError):
        mgr.prepare_store([2, 3] if how == "protected" else [3])


class NotLeading(RecordingFIFO):
    name: ClassVar[str] = "not_leading"

    def admit(self, keys: Sequence[Key], new_keys: Sequence[Key]) -> list[Key]:
        return list(new_keys)[1:]


@pytest.mark.parametrize("native", CORES)
def test_an_admit_answer_that_is_not_a_leading_part_raises_policy_error(native: bool) -> None:
    if native and not manager.NATIVE:
        pytest.skip("compiled core not built")
    mgr = OffloadingManager(4, block_size=1, policy=NotLeading(), native=native)
    with pytest.raises(PolicyError, match="leading part"):
        mgr.prepare_store([1, 2, 3])


@pytest.mark.parametrize("native", CORES)
def test_weighted_lru_with_both_weights_zero_is_plain_lru(native: bool) -> None:
    """Same victims, call by call, as `lru` on a random workload with reuse."""
    if native and not manager.NATIVE:
        pytest.skip("compiled core not built")
    import random

    rnd = random.Random(7)
    lru = OffloadingManager(20, block_size=16, policy="lru", native=native)
    weighted = OffloadingManager(
        20,
        block_size=16,
        policy=WeightedLRUPolicy(20, frequency_weight=0, size_weight=0),
        native=native,
    )
    evictions = 0
    for _ in range(2000):
        keys = list(dict.fromkeys(rnd.randrange(60) for _ in range(rnd.randrange(1, 6))))
        outs = []
        assert lru.lookup(keys) == weighted.lookup(keys)
        for mgr in (lru, weighted):
            mgr.touch(keys)
            out = mgr.prepare_store(keys)
            assert out is not None
            mgr.complete_store(out.block_hashes_to_store)
            outs.append((out.block_hashes_to_store, out.block_hashes_evicted))
        assert outs[0] == outs[1]
        evictions += len(outs[0][1])
    assert evictions > 1000


@pytest.mark.parametrize("field", ["frequency_weight", "size_weight"])
@pytest.mark.parametrize(
    "weight", ["0.5", None, True, float("nan"), float("inf"), -float("inf"), 2**1100]
)
def test_a_weighted_lru_weight_that_is_not_a_finite_number_is_a_config_error(
    field: str, weight: object
) -> None:
    """docs/policies.md: raised when the policy is made, naming the weight (it used
    to surface as a TypeError from the first prepare_store, or order by NaN)."""
    with pytest.raises(ConfigError, match=f"^{field} must be a finite number, got "):
        WeightedLRUPolicy(20, **{field: weight})  # type: ignore[arg-type]


def test_weighted_lru_takes_any_finite_int_or_float_weight() -> None:
    import numpy as np

    for weights in (
        {"frequency_weight": 2, "size_weight": 0.5},
        {"frequency_weight": -1.5},
        {"size_weight": np.float64(0.25)},  # a float subclass
    ):
        policy = WeightedLRUPolicy(4, **weights)  # type: ignore[arg-type]
        mgr = OffloadingManager(4, block_size=16, policy=policy)
        out = mgr.prepare_store([1, 2, 3, 4])
        assert out is not None
        mgr.complete_store(out.block_hashes_to_store)
        assert mgr.prepare_store([5]) is not None


@pytest.mark.parametrize("native", CORES)
@pytest.mark.parametrize(
    ("weights", "victims"),
    [
        # 41 uses: 41 ** 200 is past a float's range, the other blocks' are not.
        ({"frequency_weight": 200}, [2, 4]),
        ({"frequency_weight": 200.0}, [2, 4]),
        # (41 / 16) ** 300 is finite, (1 / 16) ** 300 is 0.0.
        ({"size_weight": 300.0, "frequency_weight": 300.0}, [2, 4]),
        # 16 ** -300 is 0.0: every priority is infinite, so the order is LRU's.
        ({"size_weight": -300}, [2, 1]),
    ],
)
def test_a_finite_weight_whose_priority_leaves_a_floats_range_keeps_working(
    weights: dict[str, float], victims: list[int], native: bool
) -> None:
    """Any finite weight is taken, so it must work for every block: a priority
    past a float's range is infinite (one below it 0.0), ties to the least
    recently used. These raised OverflowError or ZeroDivisionError out of touch
    or prepare_store, a block's use count already raised."""
    if native and not manager.NATIVE:
        pytest.skip("compiled core not built")
    mgr = OffloadingManager(3, block_size=16, policy=WeightedLRUPolicy(3, **weights), native=native)
    out = mgr.prepare_store([1, 2, 3])
    assert out is not None
    mgr.complete_store([1, 2, 3])
    for _ in range(40):
        mgr.touch([1])
    mgr.touch([3])
    evicted = []
    for new in (4, 5):
        out = mgr.prepare_store([new])
        assert out is not None
        evicted += out.block_hashes_evicted
        mgr.complete_store([new])
    assert evicted == victims


@pytest.mark.parametrize("capacity", ["4", None, True, 2.5, -1])
@pytest.mark.parametrize("cls", [LRUPolicy, ARCPolicy, WeightedLRUPolicy, PrefixAdmitPolicy])
def test_a_built_in_policy_given_a_capacity_that_is_not_a_count_is_a_config_error(
    cls: type, capacity: object
) -> None:
    """Raised when the policy is made, naming capacity (ARCPolicy and
    PrefixAdmitPolicy took these and failed in a later handshake with a
    TypeError, KeyError or StopIteration; the others took anything)."""
    minimum = 1 if cls is PrefixAdmitPolicy else 0
    with pytest.raises(ConfigError, match=rf"^capacity: expected an int >= {minimum}, got "):
        cls(capacity)
    with pytest.raises(ConfigError, match=r"^capacity: "):
        make_policy(cls.name, capacity)  # type: ignore[arg-type]


@pytest.mark.parametrize("native", CORES)
def test_prefix_admit_needs_a_capacity_of_one_block_the_others_take_zero(native: bool) -> None:
    if native and not manager.NATIVE:
        pytest.skip("compiled core not built")
    with pytest.raises(ConfigError, match=r"^capacity: expected an int >= 1, got 0$"):
        PrefixAdmitPolicy(0)
    import numpy as np

    for policy in (LRUPolicy(), WeightedLRUPolicy(), ARCPolicy(0), PrefixAdmitPolicy(np.int64(1))):
        mgr = OffloadingManager(2, block_size=1, policy=policy, native=native)
        for keys in ([1, 2], [3], [4, 1]):
            mgr.touch(keys)
            out = mgr.prepare_store(keys)
            assert out is not None
            mgr.complete_store(out.block_hashes_to_store)
        assert mgr.lookup([4]) == 1


def test_the_built_in_policies_are_python_classes_that_run_as_objects() -> None:
    """ "A built-in policy is also a Python class ... passing such an object runs
    it through the call-back entry"."""
    for cls in (LRUPolicy, ARCPolicy, WeightedLRUPolicy, PrefixAdmitPolicy):
        policy = cls(4)
        mgr = OffloadingManager(4, block_size=16, policy=policy)
        assert mgr.policy is policy
        assert mgr.policy_name == policy.name
        out = mgr.prepare_store([1, 2])
        assert out is not None
        mgr.complete_store([1, 2])
        assert mgr.lookup([1, 2]) == 2


# --- How callers see a declined store ---------------------------------------------


@pytest.mark.anyio
async def test_a_declined_store_in_the_served_cache_is_neither_stored_nor_present() -> None:
    """ "await kv.store(keys, src) returns a StoreResult whose stored + present is
    less than len(keys): the difference is the declined keys (written nowhere,
    reported neither as stored nor as present). Nothing is raised."

    Chains of a shared root and three new keys; the first new key of each chain
    is asked for again four chains later (after it was evicted), the others
    never: prefix_admit learns to decline the chains' tails."""
    config = kvactors.Config(
        block_bytes=64,
        cpu=kvactors.TierConfig(num_blocks=8, policy="prefix_admit"),
        nvme=None,
        move_bytes=False,
    )
    short = 0
    with anyio.fail_after(60):
        async with kvactors.open(config) as kv:
            for i in range(300):
                keys = [1, 1000 + 3 * i, 1001 + 3 * i, 1002 + 3 * i]
                await kv.load(keys, None, partial=True)
                if i >= 4:
                    await kv.load([1, 1000 + 3 * (i - 4)], None, partial=True)
                result = await kv.store(keys, None)
                assert result is not None
                assert result.stored + result.present <= len(keys)
                if result.stored + result.present < len(keys):
                    short += 1
                    # The admitted keys are a leading part: lookups stop there.
                    found = await kv.lookup(keys)
                    assert found.hits == result.stored + result.present
            stats = await kv.stats()
    assert short > 0
    offered_new = 1 + 3 * 300
    declined = offered_new - stats.policy.tiers["cpu"].stores
    assert declined > 0
