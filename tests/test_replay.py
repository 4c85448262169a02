"""Trace loading, policy replay and Belady's MIN, checked against results worked out by hand."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _managers import ADMITTING
from _workloads import write_trace
from kvactors.cli.replay import (
    belady,
    capacity_blocks,
    gap_share,
    replay,
    replay_served,
    resolve_trace,
)
from kvactors.errors import ConfigError, InvalidKeyError, KVActorsError
from kvactors.policy import POLICIES
from kvactors.traces import BUNDLED_TRACES, TraceError, TraceRequest, bundled_trace, load_trace

STORING = [policy for policy in POLICIES if policy not in ADMITTING]
"""The policies that store every missing block of a request that fits, as MIN does."""

# The textbook reference string (Silberschatz, Operating System Concepts): with
# 3 frames OPT takes 9 faults and LRU 12, so 11 and 8 hits out of 20.
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]

HAND_TRACE = [[1, 2, 3], [1, 2, 4], [1, 5, 6], [1, 2, 3], [1, 5], [2, 3], [7, 2]]


# -- replay through the manager ------------------------------------------------


def test_lru_replay_counts_leading_hits() -> None:
    """LRU, 4 blocks; order listed least recent first, after each request.

    r1 [1,2,3]: 0 hits; store 1,2,3                      -> 1 2 3
    r2 [1,2,4]: 2 hits (1,2); touch -> 3 2 1; store 4    -> 3 2 1 4
    r3 [1,5,6]: 1 hit; touch -> 3 2 4 1; evict 3,2       -> 4 1 5 6
    r4 [1,2,3]: 1 hit (2 is gone); touch; evict 4,5      -> 6 1 2 3
    r5 [1,5]:   1 hit; touch -> 6 2 3 1; evict 6         -> 2 3 1 5
    r6 [2,3]:   2 hits; touch -> 1 5 3 2                 -> 1 5 3 2
    r7 [7,2]:   0 hits: 2 is present but not leading; evict 1
    hits 0+2+1+1+1+2+0 = 7 of 18 accesses; evictions 2+2+1+1 = 6.
    """
    result = replay(HAND_TRACE, "lru", 4)
    assert (result.hits, result.accesses, result.evictions) == (7, 18, 6)
    assert result.requests == 7
    assert result.stores_refused == 0
    assert result.hit_ratio == 7 / 18
    assert result.resident_hits is None


def test_arc_replay_by_hand() -> None:
    """ARC, 2 blocks, one key per request: [1] [1] [2] [3] [1] [2] [3] [1].

    r1 miss, T1={1}. r2 hit; touch moves 1 to T2. r3 miss, T1={2}.
    r4 miss: |T1|=1 >= target 0, evict 2 from T1 (B1={2}); T1={3}.
    r5 hit (1 in T2). r6 miss: 2 in B1 raises target to 1; |T1|=1 >= 1,
    evict 3 (B1={3} once 2 is re-inserted); T1={2}. r7 miss: 3 in B1 raises
    target to 2; |T1|=1 < 2, evict 1 from T2 (B2={1}); T1={2,3}. r8 miss: 1 in
    B2 lowers target to 1; evict 2 from T1. Hits 2, evictions 4. LRU on the same
    requests hits only r2 and evicts 5 times.
    """
    requests = [[1], [1], [2], [3], [1], [2], [3], [1]]
    arc = replay(requests, "arc", 2)
    assert (arc.hits, arc.evictions) == (2, 4)
    lru = replay(requests, "lru", 2)
    assert (lru.hits, lru.evictions) == (1, 5)


def test_request_larger_than_capacity_stores_nothing() -> None:
    """2 blocks: [1,2,3] cannot fit, so prepare_store returns None and [1] then misses."""
    result = replay([[1, 2, 3], [1], [1]], "lru", 2)
    assert (result.hits, result.stores_refused, result.evictions) == (1, 1, 0)


def test_replay_rejects_a_key_named_twice() -> None:
    with pytest.raises(InvalidKeyError, match="named twice"):
        replay([[1, 1]], "lru", 4)


# -- Belady's MIN ----------------------------------------------------------------


def test_belady_textbook_example() -> None:
    """With one block per request, leading hits are plain hits: OPT takes 9 faults."""
    requests = [[page] for page in TEXTBOOK]
    bound = belady(requests, 3)
    assert (bound.hits, bound.evictions, bound.accesses) == (11, 6, 20)
    assert bound.resident_hits == 11
    lru = replay(requests, "lru", 3)
    assert (lru.hits, lru.evictions) == (8, 9)


def test_belady_multi_block_by_hand() -> None:
    """MIN, 3 blocks: [1,2] [3] [4] [1,2] [3].

    r2 [4] must evict one of 1,2,3: 1 and 2 are next used at r3, 3 at r4, so 3
    goes. r3 hits both 1 and 2. r4 [3] evicts the deepest never-used block (2).
    Hits 2, evictions 2. LRU evicts 1 at r2, so r3 has no leading hit.
    """
    requests = [[1, 2], [3], [4], [1, 2], [3]]
    bound = belady(requests, 3)
    assert (bound.hits, bound.evictions, bound.resident_hits) == (2, 2, 2)
    assert replay(requests, "lru", 3).hits == 0


def test_belady_ties_evict_the_deeper_block() -> None:
    """2 blocks: [1,2] [3] [1,2]. At r1, 1 and 2 are both next used at r2; the
    deeper block (2) goes, so r2 keeps its leading hit: 1 hit, not 0."""
    bound = belady([[1, 2], [3], [1, 2]], 2)
    assert (bound.hits, bound.evictions) == (1, 2)


def test_belady_is_not_a_bound_without_chained_prefixes() -> None:
    """2 blocks: [1,5] [4] [5,1]; block 5 is first at r2 but second at r0.

    MIN evicts 5 at r1 (tie with 1, and deeper at its last use), so r2 has no
    leading hit though 1 is resident. LRU evicts 1 (inserted first) and hits 5.
    """
    requests = [[1, 5], [4], [5, 1]]
    bound = belady(requests, 2)
    assert (bound.hits, bound.resident_hits) == (0, 1)
    assert replay(requests, "lru", 2).hits == 1


def test_belady_is_not_a_bound_when_stores_are_refused() -> None:
    """2 blocks: [4,3] [0] [3,4,2] [3]. The 3-block request is refused, so it
    accesses blocks without storing them and MIN's farthest-next-use rule no
    longer decides well: MIN keeps 4 and gets 0 leading hits, LRU keeps 3 and 2."""
    requests = [[4, 3], [0], [3, 4, 2], [3]]
    bound = belady(requests, 2)
    assert (bound.hits, bound.resident_hits, bound.stores_refused) == (0, 1, 1)
    lru = replay(requests, "lru", 2)
    assert (lru.hits, lru.stores_refused) == (2, 1)


def test_prefix_admit_stores_the_admitted_part_of_a_request_larger_than_the_tier() -> None:
    """docs/replay.md: under prefix_admit a request with more blocks than the tier still
    stores the blocks it admits when they fit beside its present ones; `stores refused`
    counts only the requests whose prepare_store returned None. 2 blocks, as above:
    [3, 4, 2] finds 4 present, admits 3 (declines 2) and stores it in the slot of 0,
    so [3] hits; the storing policies refuse the request."""
    requests = [[4, 3], [0], [3, 4, 2], [3]]
    for run in (replay, replay_served):
        admit = run(requests, "prefix_admit", 2)
        assert (admit.hits, admit.stores_refused) == (1, 0), run
        for policy in STORING:
            assert run(requests, policy, 2).stores_refused == 1, (run, policy)


def test_belady_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="capacity"):
        belady([[1]], 0)
    with pytest.raises(InvalidKeyError, match="request 1: block key 5"):
        belady([[1], [5, 5]], 2)


@pytest.mark.parametrize("bad", ["a", True, 1.5, None, bytearray(b"k")])
def test_belady_rejects_the_keys_replay_rejects(bad: object) -> None:
    """A key that is not bytes/int is an InvalidKeyError naming it in both runs
    (belady named only repeated keys, and ran a trace of str keys)."""
    requests: Any = [[10, 20], [30, bad], [bad]]
    with pytest.raises(InvalidKeyError, match="block key"):
        replay(requests, "lru", 4)
    kind = type(bad).__name__
    want = f"request 1: block key {bad!r} has type {kind}; keys must be bytes or int"
    with pytest.raises(InvalidKeyError, match=f"^{re.escape(want)}$"):
        belady(requests, 4)  # named in the first request naming it


@st.composite
def fitting_requests(draw: st.DrawFn) -> tuple[list[list[int]], int]:
    """Up to 10 requests of distinct keys from 0..7, none larger than the capacity."""
    capacity = draw(st.integers(1, 6))
    request = st.lists(st.integers(0, 7), min_size=1, max_size=capacity, unique=True)
    return draw(st.lists(request, min_size=1, max_size=10)), capacity


@st.composite
def chained_requests(draw: st.DrawFn) -> tuple[list[list[int]], int]:
    """Requests that walk a prefix tree: a key always follows the same prefix."""
    capacity = draw(st.integers(1, 6))
    children: dict[tuple[int, ...], list[int]] = {}
    fresh = 0
    requests: list[list[int]] = []
    for _ in range(draw(st.integers(1, 10))):
        path: list[int] = []
        for _ in range(draw(st.integers(1, capacity))):
            known = children.setdefault(tuple(path), [])
            reuse: bool = draw(st.booleans())
            if known and reuse:
                key = draw(st.sampled_from(known))
            else:
                key, fresh = fresh, fresh + 1
                known.append(key)
            path.append(key)
        requests.append(path)
    return requests, capacity


@settings(max_examples=300, deadline=None)
@given(fitting_requests())
def test_min_resident_hits_bound_every_policy(case: tuple[list[list[int]], int]) -> None:
    """With no refused store, MIN's resident hits are at least any policy's leading hits."""
    requests, capacity = case
    bound = belady(requests, capacity)
    assert bound.resident_hits is not None
    for policy in STORING:
        assert replay(requests, policy, capacity).hits <= bound.resident_hits


@settings(max_examples=300, deadline=None)
@given(chained_requests())
def test_min_leading_hits_bound_every_policy_on_chained_traces(
    case: tuple[list[list[int]], int],
) -> None:
    """On a chained trace MIN's resident set stays prefix-closed: leading hits are a bound."""
    requests, capacity = case
    bound = belady(requests, capacity)
    assert bound.hits == bound.resident_hits
    for policy in STORING:
        assert replay(requests, policy, capacity).hits <= bound.hits


def test_a_policy_that_declines_stores_can_beat_min() -> None:
    """MIN stores every missing block of a request that fits; a policy that may
    decline blocks is not bound by it. 4 blocks: prefix_admit finds 3 leading hits
    here, MIN 2 (it must store [7, 8] and [0, 11, 12] and loses part of
    [9, 10, 13]); docs/replay.md quotes this example."""
    requests = [[7, 8, 14], [9, 10, 13], [7, 8], [0, 11, 12], [9, 10, 13]]
    bound = belady(requests, 4)
    assert (bound.hits, bound.resident_hits) == (2, 2)
    assert replay(requests, "prefix_admit", 4).hits == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLED_TRACES)
def test_belady_bounds_every_policy_on_bundled_traces(name: str) -> None:
    """The bundled traces are chained (a block id always follows the same
    prefix), and no request exceeds these capacities: MIN's leading hits equal
    its resident hits and are at least every policy's hits."""
    requests = [r.hash_ids for r in load_trace(bundled_trace(name))]
    unique = len({key for blocks in requests for key in blocks})
    for fraction in (Fraction(1, 100), Fraction(1, 20), Fraction(1, 5)):
        capacity = capacity_blocks(unique, blocks=None, fraction=fraction)
        bound = belady(requests, capacity)
        assert bound.stores_refused == 0
        assert bound.hits == bound.resident_hits
        for policy in POLICIES:
            result = replay(requests, policy, capacity)
            assert result.accesses == bound.accesses
            assert result.hits <= bound.hits, (policy, capacity)


# -- capacity --------------------------------------------------------------------


def test_capacity_fraction_is_floored_exactly() -> None:
    assert capacity_blocks(7, blocks=None, fraction=Fraction(1, 2)) == 3
    # 0.29 * 100 is 28.999999999999996 in floats; the fraction is exact.
    assert capacity_blocks(100, blocks=None, fraction=Fraction("0.29")) == 29
    assert capacity_blocks(95, blocks=None, fraction=None) == 9  # default 0.1
    assert capacity_blocks(95, blocks=40, fraction=None) == 40


def test_capacity_of_zero_blocks_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"--capacity 0\.1 of 9 unique blocks is 0 blocks"):
        capacity_blocks(9, blocks=None, fraction=None)
    with pytest.raises(ConfigError, match="--blocks"):
        capacity_blocks(9, blocks=0, fraction=None)


# -- traces ----------------------------------------------------------------------


def test_load_trace_reads_requests_in_order(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"timestamp": 0, "input_length": 700, "output_length": 3, "hash_ids": [0, 1]}\n'
        "\n"
        '{"timestamp": 1.5, "input_length": 10, "output_length": 0, "hash_ids": [0], "x": 1}\n'
    )
    assert load_trace(path) == [
        TraceRequest(timestamp=0, input_length=700, output_length=3, hash_ids=[0, 1]),
        TraceRequest(timestamp=1.5, input_length=10, output_length=0, hash_ids=[0]),
    ]


def test_trace_fields_as_docs_replay_md_gives_them(tmp_path: Path) -> None:
    """docs/replay.md: ids of either sign and past 64 bits, an empty hash_ids, requests
    in file order whatever their timestamps; each of the four fields is required."""
    ids = [-1, 2**64, -(2**70), 0]
    path = write_trace(tmp_path / "t.jsonl", [[5], ids, []])
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace('"timestamp": 0', '"timestamp": 900')
    path.write_text("\n".join(lines) + "\n")
    requests = load_trace(path)
    assert [r.hash_ids for r in requests] == [[5], ids, []]
    assert [r.timestamp for r in requests] == [900, 1, 2]
    result = replay([r.hash_ids for r in requests], "lru", 4)
    assert (result.requests, result.accesses) == (3, 5)
    for field in ("timestamp", "input_length", "output_length", "hash_ids"):
        record = {"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]}
        del record[field]
        (tmp_path / "m.jsonl").write_text(json.dumps(record) + "\n")
        with pytest.raises(TraceError, match=rf"m\.jsonl:1: .*`{field}`"):
            load_trace(tmp_path / "m.jsonl")


@pytest.mark.parametrize(
    ("line", "detail"),
    [
        (
            '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1,',
            "not valid JSON",
        ),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1}', "`hash_ids`"),
        (
            '{"timestamp": 0, "input_length": -1, "output_length": 1, "hash_ids": []}',
            "input_length",
        ),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": ["a"]}', "hash_ids"),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [true]}', "hash_ids"),
        (
            '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [4, 4]}',
            "4 is named",
        ),
        ("[1, 2, 3]", "Expected `object`"),
    ],
)
def test_malformed_line_names_the_line(tmp_path: Path, line: str, detail: str) -> None:
    good = '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]}'
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(TraceError, match=rf"bad\.jsonl:3: .*{detail}") as info:
        load_trace(path)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, KVActorsError)


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"cannot read trace .*nope\.jsonl"):
        load_trace(tmp_path / "nope.jsonl")


def test_bundled_traces_ship_with_the_package() -> None:
    conversation = load_trace(bundled_trace("conversation"))
    default = load_trace(bundled_trace())
    assert len(conversation) == 12_031
    assert default == conversation
    assert len(load_trace(bundled_trace("synthetic"))) == 3_993
    assert bundled_trace("conversation").parent.name == "data"
    assert sum(len(r.hash_ids) for r in conversation) == 288_500
    with pytest.raises(TraceError, match="unknown bundled trace 'chat'; bundled: conversation"):
        bundled_trace("chat")


def test_resolve_trace_names_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_trace(None) == bundled_trace("conversation")
    assert resolve_trace("synthetic") == bundled_trace("synthetic")
    monkeypatch.chdir(tmp_path)
    write_trace(tmp_path / "synthetic", [[1]])
    assert resolve_trace("synthetic") == Path("synthetic")  # an existing file wins
    (tmp_path / "conversation").mkdir()  # a directory of that name does not
    assert resolve_trace("conversation") == bundled_trace("conversation")
    assert resolve_trace("x.jsonl") == Path("x.jsonl")


# -- the LRU -> MIN gap and the served cache ---------------------------------------


def test_gap_share() -> None:
    assert gap_share(80, 80, 100) == 0.0
    assert gap_share(90, 80, 100) == 0.5
    assert gap_share(100, 80, 100) == 1.0
    assert gap_share(70, 80, 100) == -0.5  # worse than LRU
    assert gap_share(5, 5, 5) is None  # no gap to close


def chained_trace() -> list[list[int]]:
    """Two sessions of growing chains and one-off requests: a chained trace."""
    return [
        [0, 1, 2], [0, 3], [0, 1, 2, 4], [5, 6], [0, 3, 7], [0, 1, 2, 4, 8],
        [9], [0, 3, 7, 10], [5, 6, 11], [0, 1, 2], [0, 3, 7, 10, 12],
    ]  # fmt: skip


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_served_replay_with_and_without_bytes_agree(policy: str) -> None:
    """The served cache places blocks the same whether or not bytes move, and on a
    chained trace MIN bounds it for a policy that stores every missing block (an
    admitting one may beat MIN, as on one manager)."""
    requests = chained_trace()
    bare = replay_served(requests, policy, 4)
    copied = replay_served(requests, policy, 4, move_bytes=True)
    assert (bare.hits, bare.evictions, bare.stores_refused) == (
        copied.hits,
        copied.evictions,
        copied.stores_refused,
    )
    assert bare.accesses == sum(map(len, requests))
    assert bare.policy == policy
    assert bare.hits == replay(requests, policy, 4).hits
    if policy in STORING:
        assert 0 < bare.hits <= belady(requests, 4).hits


def test_served_lru_applies_recency() -> None:
    """4 blocks: [1] is loaded (a hit, hence an access) before each store of two new
    blocks, so it stays while everything stored around it is evicted; a cache that
    ignored loads would evict 1 at the third store."""
    requests = [[1]]
    for i in range(20):
        requests += [[1], [100 + 2 * i, 101 + 2 * i]]
    result = replay_served(requests, "lru", 4)
    assert result.hits == 20  # every [1] after the first
    assert replay(requests, "lru", 4).hits == 20  # as the bare manager


def test_served_replay_refuses_requests_larger_than_the_tier() -> None:
    result = replay_served([[1, 2, 3], [1]], "lru", 2)
    assert (result.hits, result.stores_refused) == (0, 1)


def test_served_replay_rejects_a_bad_capacity() -> None:
    with pytest.raises(ConfigError):
        replay_served([[1]], "lru", 0)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_served_cache_and_one_manager_agree_on_a_trace(policy: str) -> None:
    """A request's ``load(partial=True)`` then ``store`` through the served cache
    gives the policy what one manager's ``lookup``, ``touch``, ``prepare_store``
    gives it: the same hit ratio on a slice of the bundled synthetic trace, within
    0.0005 (ARC's ghost hits and weighted_lru's use counts included: touching only
    the hits, or a hit twice, put them 0.0025 and 0.001 apart here)."""
    requests = [r.hash_ids for r in load_trace(bundled_trace("synthetic"))[:2000]]
    capacity = len({k for r in requests for k in r}) // 5
    served = replay_served(requests, policy, capacity)
    bare = replay(requests, policy, capacity)
    assert served.hits > 0
    assert abs(served.hit_ratio - bare.hit_ratio) <= 0.0005, (served.hits, bare.hits)
