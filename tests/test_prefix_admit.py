"""The prefix_admit policy: admission inside the handshake, leaves before heads,
online feedback, and never falling apart against LRU on unseen sharing shapes."""

from __future__ import annotations

from typing import Any

import pytest

from _managers import make_manager
from _workloads import SHAPES, WORKLOADS, prefix_tree
from kvactors import OffloadingManager
from kvactors.cache.policy_actor import PolicyActor
from kvactors.cli.replay import belady, replay
from kvactors.config import Config, NVMeConfig, TierConfig
from kvactors.manager import NATIVE
from kvactors.policy import PrefixAdmitPolicy, make_policy
from kvactors.policy.prefix_admit import NEW_CLASSES, duel_sample, new_class

CORES = ["prefix_admit", "prefix_admit-python"]


def test_registered_by_name() -> None:
    policy = make_policy("prefix_admit", 8)
    assert isinstance(policy, PrefixAdmitPolicy)
    assert policy.name == "prefix_admit"


def test_classes_of_new_blocks() -> None:
    """Last key, extension of a present prefix and the length bucket each change the class."""
    assert new_class(2, 3, False) != new_class(1, 3, False)  # last vs not
    assert new_class(1, 3, True) != new_class(1, 3, False)  # extends a cached prefix
    assert new_class(1, 3, False) != new_class(1, 40, False)  # 2-7 vs 32+ keys
    seen = {new_class(p, n, e) for n in (1, 3, 9, 40) for p in range(n) for e in (False, True)}
    assert len(seen) == NEW_CLASSES - 2  # a 1-key call has only a last key
    assert max(seen) == NEW_CLASSES - 1
    assert new_class(0, 1, False) < new_class(0, 2, False)  # a last key sorts first


def test_a_chain_loses_its_last_block_first() -> None:
    """Classes of equal value: 3 slots hold [1, 2, 3]; storing 4 evicts 3 (the
    chain's leaf, in the first class on a tie), then 2; 1 still hits."""
    policy = PrefixAdmitPolicy(3)
    mgr = make_manager(3, policy)
    out = mgr.prepare_store([1, 2, 3])
    assert out is not None
    mgr.complete_store(out.block_hashes_to_store)
    policy.births = [1.0] * len(policy.births)
    policy.uses = [0.5] * len(policy.uses)
    policy.clock = 0.0
    for key in (1, 2, 3):  # as if stored now, at equal value
        policy.lists[policy._class[key]][key] = 0.5
    out = mgr.prepare_store([4, 5])
    assert out is not None
    assert out.block_hashes_evicted == [3, 2]
    mgr.complete_store(out.block_hashes_to_store)
    assert mgr.lookup([1, 2, 3]) == 1


def test_a_hot_prefix_survives_a_flood_of_one_off_chains() -> None:
    """16 slots; a 3-block prefix used every other request, and between its uses a
    15-block chain never seen again. LRU, ARC and weighted LRU lose the prefix to
    every flood (0 hits); prefix_admit learns that used blocks are used again and
    the floods never are, and keeps the prefix."""
    requests: list[list[int]] = []
    for i in range(300):
        requests += [[1, 2, 3], [1000 + 100 * i + j for j in range(15)]]
    for policy in ("lru", "arc", "weighted_lru"):
        assert replay(requests, policy, 16).hits == 0
    assert replay(requests, "prefix_admit", 16).hits >= 3 * 280


def _declining_policy() -> PrefixAdmitPolicy:
    """A policy that has learned: evictions are regretted half the time, blocks are
    used again 9 times in 10, but the last block of a 3-key call almost never."""
    policy = PrefixAdmitPolicy(4)
    policy.evictions, policy.regrets = 10.0, 5.0
    policy.births = [10.0] * len(policy.births)
    policy.uses = [9.0] * len(policy.uses)
    last = new_class(2, 3, False)
    policy.births[last], policy.uses[last] = 100.0, 1.0
    return policy


def test_declines_a_class_worth_less_than_the_regret_squared() -> None:
    """A full tier stores the leading part of a chain up to the declined key; the
    manager's output lists only the stored keys, and lookups stop there."""
    policy = _declining_policy()
    mgr = make_manager(4, policy)
    out = mgr.prepare_store([1, 2, 3])  # room for all: nothing is declined
    assert out is not None
    assert out.block_hashes_to_store == [1, 2, 3]
    mgr.complete_store([1, 2, 3])
    out = mgr.prepare_store([5, 6, 7])  # would evict: the last key is declined
    assert out is not None
    assert out.block_hashes_to_store == [5, 6]
    assert len(out.store_spec.block_ids) == 2
    assert len(out.block_hashes_evicted) == 1
    mgr.complete_store(out.block_hashes_to_store)
    assert mgr.lookup([5, 6, 7]) == 2
    assert 7 not in mgr
    assert mgr.stats().being_written == 0


def test_a_declined_class_is_admitted_again_after_ghost_hits() -> None:
    """Declined keys are ghosts: asking for them again raises their class's value
    until the class clears the bar and is stored."""
    policy = _declining_policy()
    mgr = make_manager(4, policy)
    mgr.complete_store(mgr.prepare_store([1, 2, 3]).block_hashes_to_store)  # type: ignore[union-attr]
    last = new_class(2, 3, False)
    declined = 0
    for i in range(400):
        keys = [100 + 3 * i, 101 + 3 * i, 102 + 3 * i]
        out = mgr.prepare_store(keys)
        assert out is not None
        mgr.complete_store(out.block_hashes_to_store)
        if keys[2] not in out.block_hashes_to_store:
            declined += 1
            mgr.touch([keys[2]])  # the declined key is asked for: a ghost hit
        if policy.value(last) >= policy.regret**2:
            break
    assert declined > 0
    assert policy.value(last) >= policy.regret**2
    out = mgr.prepare_store([900, 901, 902])
    assert out is not None
    assert out.block_hashes_to_store == [900, 901, 902]


def _evict_then_ask_again(mgr: OffloadingManager) -> None:
    """2 slots: store [1, 2], then [3, 4] (evicting both), then ask for [1, 2] again."""
    for keys in ([1, 2], [3, 4]):
        out = mgr.prepare_store(keys)
        assert out is not None
        mgr.complete_store(out.block_hashes_to_store)
    assert 1 not in mgr
    assert 2 not in mgr
    mgr.touch([1, 2])  # both are ghosts that left 2 stores ago: within the window


def test_a_key_back_within_the_window_reenters_as_a_reused_block() -> None:
    """An evicted key asked for again within a turnover of stores is stored in
    the class its use would have moved it to, when that class is worth more
    than its new class; a call's last key keeps its new class."""
    policy = PrefixAdmitPolicy(2)
    mgr = make_manager(2, policy)
    _evict_then_ask_again(mgr)
    assert policy._returning == {1: NEW_CLASSES, 2: NEW_CLASSES}
    policy.uses[NEW_CLASSES] = 10.0 * policy.births[NEW_CLASSES]  # reused blocks pay off
    policy.regrets = 0.0  # and nothing is declined
    out = mgr.prepare_store([1, 2])
    assert out is not None
    assert out.block_hashes_to_store == [1, 2]
    assert policy._class[1] == NEW_CLASSES
    assert policy._class[2] == new_class(1, 2, False)  # the last key


def test_a_key_back_keeps_its_new_class_when_that_is_worth_more() -> None:
    policy = PrefixAdmitPolicy(2)
    mgr = make_manager(2, policy)
    _evict_then_ask_again(mgr)
    first = new_class(0, 2, False)
    policy.uses[first] = 10.0 * policy.births[first]
    out = mgr.prepare_store([1, 2])
    assert out is not None
    assert policy._class[1] == first


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize(
    ("requests", "cls", "reused"),
    [
        # 10 is a ghost back within the window (used twice before), admitted by the
        # same call as 11, whose ghost is older
        ([[10], [10, 11], [1, 2], [20, 21, 22], [10, 11, 12], [20]], NEW_CLASSES + 1, [11, 10]),
        # 1 is held, in a reused class, when 2 (an older ghost) comes back
        ([[1, 2], [1], [1, 2, 3, 4], [20, 21, 22], [1], [1, 2, 3]], NEW_CLASSES, [1, 2]),
    ],
)
def test_a_ghost_behind_a_reused_block_takes_its_class(
    core: str, requests: list[list[int]], cls: int, reused: list[int]
) -> None:
    """A key that comes back after its ghost left the window (so it has no reused
    class of its own to return to) right behind a reused block enters that block's
    class, on both cores (without that rule it keeps a new class)."""
    mgr = make_manager(3, core)
    _handshake(mgr, requests)
    lists = _state(mgr)[7]
    assert [key for key, _ in lists[cls]] == reused


@pytest.mark.skipif(not NATIVE, reason="compiled core not built")
def test_both_cores_remember_the_keys_back_within_the_window() -> None:
    """The compiled core reports the same returning keys and classes as the Python
    one, and both keep them through a touch that finds no ghost."""
    managers = [
        OffloadingManager(2, block_size=16, policy="prefix_admit", native=n) for n in (True, False)
    ]
    for mgr in managers:
        _evict_then_ask_again(mgr)
    native, python = managers
    state = native._core.policy_state()  # type: ignore[attr-defined]
    assert state == python.policy.order_state()  # type: ignore[union-attr]
    assert state[10] == {1: NEW_CLASSES, 2: NEW_CLASSES}  # returning
    for mgr in managers:  # a touch finding no ghost (a served load touching its hits) keeps them
        mgr.touch([3, 4])
    state = native._core.policy_state()  # type: ignore[attr-defined]
    assert state == python.policy.order_state()  # type: ignore[union-attr]
    assert state[10] == {1: NEW_CLASSES, 2: NEW_CLASSES}  # returning


def test_a_tier_with_room_stores_everything() -> None:
    policy = _declining_policy()
    mgr = make_manager(16, policy)
    out = mgr.prepare_store([1, 2, 3])
    assert out is not None
    assert out.block_hashes_to_store == [1, 2, 3]


def test_refusal_still_means_nothing_changed() -> None:
    """prepare_store returns None when even the admitted keys find no idle block."""
    mgr = make_manager(2, "prefix_admit-python")
    mgr.complete_store(mgr.prepare_store([1, 2]).block_hashes_to_store)  # type: ignore[union-attr]
    mgr.prepare_load([1, 2])
    assert mgr.prepare_store([3]) is None
    assert len(mgr) == 2
    assert mgr.num_free_blocks == 0


def _between_lru_and_min(requests: list[list[int]], share: float, label: object) -> None:
    """At 5%, 10% and 25% of the unique blocks, prefix_admit's hits are at least
    ``share`` of LRU's and at most MIN's."""
    unique = len({key for blocks in requests for key in blocks})
    for fraction in (0.05, 0.1, 0.25):
        capacity = max(1, int(fraction * unique))
        lru = replay(requests, "lru", capacity).hits
        ours = replay(requests, "prefix_admit", capacity).hits
        assert ours >= share * lru, (label, fraction, ours, lru)
        assert ours <= belady(requests, capacity).hits


@pytest.mark.parametrize("shape", sorted(WORKLOADS))
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_never_falls_apart_on_unseen_sharing_shapes(shape: str, seed: int) -> None:
    """On chat, document QA, agent loops and scans (generated here, not fitted),
    at 5%, 10% and 25% of the unique blocks: at least 98% of LRU's hits (agent
    loops at 5% are the closest: 0.989-0.995) and never above MIN."""
    _between_lru_and_min(WORKLOADS[shape](1500, seed), 0.98, (shape, seed))


def test_runs_on_both_cores() -> None:
    """The compiled core asks ``admit`` as the Python manager does: the policy
    runs on it by default, and ``native=False`` picks the Python manager."""
    if NATIVE:
        assert OffloadingManager(4, block_size=16, policy="prefix_admit").native
        assert OffloadingManager(4, block_size=16, policy="prefix_admit", native=True).native
    python = OffloadingManager(4, block_size=16, policy="prefix_admit", native=False)
    assert not python.native
    assert isinstance(python.policy, PrefixAdmitPolicy)


def test_a_ghost_counts_a_whole_use_only_within_one_turnover_of_stores() -> None:
    """A declined key asked for again while fewer than ``capacity`` blocks were
    stored since counts a use of its class; after more (``age`` stores), it counts
    ``capacity / age`` of a use."""
    policy = _declining_policy()
    mgr = make_manager(4, policy)
    mgr.complete_store(mgr.prepare_store([1, 2, 3]).block_hashes_to_store)  # type: ignore[union-attr]
    last = new_class(2, 3, False)
    out = mgr.prepare_store([5, 6, 7])
    assert out is not None
    assert out.block_hashes_to_store == [5, 6]
    mgr.complete_store(out.block_hashes_to_store)
    uses = policy.uses[last]
    mgr.touch([7])  # 2 stores since it was declined: within the window
    assert policy.uses[last] == uses + 1.0
    out = mgr.prepare_store([15, 16, 17])
    assert out is not None
    assert out.block_hashes_to_store == [15, 16]
    mgr.complete_store(out.block_hashes_to_store)
    for i in range(3):  # 6 more blocks stored: more than the capacity (4)
        out = mgr.prepare_store([20 + 2 * i, 21 + 2 * i])
        assert out is not None
        mgr.complete_store(out.block_hashes_to_store)
    uses = policy.uses[last]
    since = {key: since for key, _, since in policy.order_state()[8]}[17]  # type: ignore[attr-defined]
    age = policy.stored - since
    assert age > 4
    mgr.touch([17])
    assert policy.uses[last] == uses + 4 / age
    assert 17 not in {key for key, _, _ in policy.order_state()[8]}  # type: ignore[attr-defined]


def test_ghosts_are_bounded_by_four_capacities() -> None:
    policy = PrefixAdmitPolicy(4)
    for key in range(100):
        policy._ghost(key, -1)  # declined, nothing stored in between
    assert len(policy.ghosts) == 16
    assert next(iter(policy.ghosts)) == 84  # the oldest went first


def test_order_state_names_everything_that_decides() -> None:
    """Two policies fed the same calls have equal order states; a touch changes it."""
    states = []
    for _ in range(2):
        policy = PrefixAdmitPolicy(4)
        mgr = make_manager(4, policy)
        for keys in ([1, 2, 3], [1, 4, 5], [6, 7]):
            mgr.touch(keys)
            out = mgr.prepare_store(keys)
            assert out is not None
            mgr.complete_store(out.block_hashes_to_store)
        states.append(policy.order_state())
    assert states[0] == states[1]
    assert states[0][0] == "prefix_admit"
    mgr.touch([6])
    assert policy.order_state() != states[0]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_never_below_lru_on_generated_prefix_trees(shape: str) -> None:
    """Prefix trees of different branching, session length, reuse skew and request
    length (tests/_workloads.py, not fitted to any trace), four seeds, at 5%, 10%
    and 25% of the unique blocks: at least LRU's hits (to 0.01%: two cells of 96,
    seeds 2 and 3 at 10% of a shape whose working set fits, are 4 hits of 88,000
    below), at most MIN's.
    Seeds 3 and 4 hold draws that seeds 1 and 2 do not: a variant keeping a
    returning key in its new class while returning keys measure below that class
    passes seeds 1 and 2 and falls to 0.976 of LRU on "few hot roots, skewed",
    seed 3, at 5%."""
    for seed in (1, 2, 3, 4):
        requests = prefix_tree(1500, seed, **SHAPES[shape])  # type: ignore[arg-type]
        _between_lru_and_min(requests, 0.9999, (shape, seed))


def test_the_nvme_tier_may_decline_a_demoted_victim() -> None:
    """CPU victims are offered to NVMe; an NVMe tier under prefix_admit that has
    learned a class is worth little declines such a victim, which then leaves the
    cache and is counted in ``demotions_declined`` (``demotions_lost`` counts the
    NVMe victim it displaced: there is no tier below NVMe)."""
    config = Config(
        block_bytes=64,
        cpu=TierConfig(num_blocks=2),
        nvme=NVMeConfig(num_blocks=2, policy="prefix_admit", backend="posix"),
        move_bytes=False,
    )
    actor = PolicyActor(config, [("cpu", False), ("nvme", False)])
    assert actor.managers[1].policy_name == "prefix_admit"
    # The same policy as a Python object, so the test can set what it has learned.
    nvme = PrefixAdmitPolicy(2)
    actor.managers[1] = OffloadingManager(
        2, block_size=64, policy=nvme, enable_events=True, medium="nvme", native=False
    )
    nvme.evictions, nvme.regrets = 10.0, 5.0
    nvme.births = [10.0] * len(nvme.births)
    nvme.uses = [9.0] * len(nvme.uses)
    second = new_class(1, 2, False)  # the second of two victims offered at once
    nvme.births[second], nvme.uses[second] = 100.0, 1.0

    def store(keys: list[int]) -> None:
        plan = actor.prepare_store(keys)
        assert plan is not None
        actor.complete(plan, [True] * len(plan.transfers))

    store([1, 2])
    store([3, 4])  # 1 and 2 are demoted: NVMe has room, admits both
    assert actor.snapshot().demoted == 2
    store([5, 6])  # victims 3, 4: NVMe is full, 4's class is declined
    snap = actor.snapshot()
    assert snap.demotions_declined == 1
    assert snap.demotions_lost == 1
    assert snap.demoted == 3
    assert 3 in actor.managers[1]
    assert 4 not in actor.managers[1]
    assert 4 not in actor.managers[0]


def test_one_off_requests_gain_a_fifth_over_lru() -> None:
    """docs/policies.md: over +20 % of LRU's hits on the generated one-off
    workload at 5 % of its unique blocks."""
    for seed in (1, 2):
        requests = prefix_tree(1500, seed, **SHAPES["one-off requests"])  # type: ignore[arg-type]
        unique = len({key for blocks in requests for key in blocks})
        capacity = int(0.05 * unique)
        lru = replay(requests, "lru", capacity).hits
        assert replay(requests, "prefix_admit", capacity).hits > 1.2 * lru


def test_the_duel_samples_one_key_in_up_to_32() -> None:
    """Each miniature holds at least 1,024 blocks: every key on small tiers,
    one in 32 on large ones."""
    assert duel_sample(1000) == 1
    assert duel_sample(2048) == 2
    assert duel_sample(32 * 1024 - 1) == 16
    assert duel_sample(10**6) == 32
    policy = PrefixAdmitPolicy(4096)
    state = policy.order_state()[-1]
    assert isinstance(state, tuple)
    assert [mini[0] for mini in state[3:]] == ["prefix_admit", "prefix_admit"]
    assert PrefixAdmitPolicy(8, duel=False).order_state()[-1] is None


def _state(mgr: OffloadingManager) -> Any:
    """The policy's order_state, from whichever core runs it."""
    if mgr.native:
        return mgr._core.policy_state()  # type: ignore[attr-defined]
    return mgr.policy.order_state()  # type: ignore[union-attr]


def _handshake(mgr: OffloadingManager, requests: list[list[int]]) -> int:
    hits = 0
    for keys in requests:
        hits += mgr.lookup(keys)
        mgr.touch(keys)
        out = mgr.prepare_store(keys)
        if out is not None:
            mgr.complete_store(out.block_hashes_to_store)
    return hits


def _floods(rounds: int) -> list[list[int]]:
    """32 slots' worth of traffic: a pool of 24 two-block chains each asked for
    again every few rounds, between them one-off 4-block chains never seen again."""
    requests: list[list[int]] = []
    for i in range(rounds):
        hot = 10_000 + 2 * (i % 24)
        requests += [[hot, hot + 1], [100 * i + j for j in range(4)]]
    return requests


@pytest.mark.parametrize("core", CORES)
def test_the_duel_cuts_one_off_chains_that_flush_the_reused_ones(core: str) -> None:
    """One-off chains would flush the reused ones: the cutting miniature wins, the
    cut turns on, and the one-off chains are declined on first sight."""
    mgr = make_manager(32, core)
    hits = _handshake(mgr, _floods(600))
    state = _state(mgr)
    assert state[11] is True  # the cut
    without, cutting = state[12][0], state[12][1]
    assert cutting > without
    out = mgr.prepare_store([900_001, 900_002])
    assert out is not None
    assert out.block_hashes_to_store == []  # never seen: declined
    assert hits > replay(_floods(600), "lru", 32).hits


@pytest.mark.parametrize("core", CORES)
def test_the_duel_keeps_the_cut_off_where_first_reuses_pay(core: str) -> None:
    """Chat turns: each request extends the last one of its session, so every new
    block is asked for again at the next turn; cutting them would lose those
    hits, and the cut stays off."""
    mgr = make_manager(32, core)
    requests: list[list[int]] = []
    for turn in range(1, 40):
        for session in range(6):
            requests.append([1000 * session + j for j in range(min(turn, 5))])
    _handshake(mgr, requests)
    state = _state(mgr)
    assert state[11] is False
