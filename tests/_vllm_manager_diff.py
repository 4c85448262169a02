"""Run in the vLLM venv: kvactors' ``OffloadingManager`` against vLLM 0.32's
``CPUOffloadingManager`` on random call sequences (``lru`` and ``arc``, both
cores, events on and off, several tier and block sizes). Prints ``ok`` or the
first difference.

vLLM's lookup is one key at a time and every call takes a request context:
the sequence uses one context and counts leading ``HIT``s. vLLM 0.32's ARC also
adapts its target when a request stores a ghost key (``on_store_miss``), which
the 0.11-era interface kvactors keeps has no counterpart for; that hook is
switched off here, as docs/manager.md states.
"""

from __future__ import annotations

import random
import sys

from vllm.v1.kv_offload.base import LookupResult, ReqContext
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager
from vllm.v1.kv_offload.cpu.policies.arc import ARCCachePolicy

from kvactors import OffloadingManager

ARCCachePolicy.on_store_miss = lambda self, keys, req_context: None  # type: ignore[method-assign]


def run(seed: int, policy: str, native: bool, events: bool) -> None:
    rng = random.Random(seed)
    num_blocks = rng.choice([1, 2, 3, 5, 8, 16])
    ctx = ReqContext(req_id="r")
    theirs = CPUOffloadingManager(num_blocks, cache_policy=policy, enable_events=events)
    ours = OffloadingManager(
        num_blocks,
        block_size=rng.choice([1, 3, 16]),
        policy=policy,
        enable_events=events,
        native=native,
    )
    universe = [bytes([i]) * 4 for i in range(num_blocks * 3)]
    pinned: dict[bytes, int] = {}
    pending: set[bytes] = set()
    for step in range(400):
        op = rng.choice(["lookup", "touch", "store", "cstore", "load", "cload", "events"])
        keys = rng.sample(universe, rng.randint(0, min(6, len(universe))))
        where = (policy, native, events, seed, step, op, keys)
        if op == "lookup":
            hits = 0
            for key in keys:
                if theirs.lookup(key, ctx) is not LookupResult.HIT:  # type: ignore[arg-type]
                    break
                hits += 1
            assert ours.lookup(keys) == hits, where
        elif op == "touch":
            theirs.touch(keys, ctx)  # type: ignore[arg-type]
            ours.touch(keys)
        elif op == "store":
            a = theirs.prepare_store(keys, ctx)  # type: ignore[arg-type]
            b = ours.prepare_store(keys)
            if a is None or b is None:
                assert a is None, (where, a, b)
                assert b is None, (where, a, b)
                continue
            assert list(a.keys_to_store) == b.block_hashes_to_store, (where, a, b)
            assert [int(i) for i in a.store_spec.block_ids] == b.store_spec.block_ids, (where, a, b)  # type: ignore[attr-defined]
            assert list(a.evicted_keys) == b.block_hashes_evicted, (where, a, b)
            pending.update(b.block_hashes_to_store)
        elif op == "cstore" and pending:
            chosen = rng.sample(sorted(pending), rng.randint(1, len(pending)))
            success = rng.random() < 0.8
            theirs.complete_store(chosen, ctx, success=success)  # type: ignore[arg-type]
            ours.complete_store(chosen, success=success)
            pending.difference_update(chosen)
        elif op == "load":
            ready = [k for k in keys if theirs.lookup(k, ctx) is LookupResult.HIT]  # type: ignore[arg-type]
            if ready:
                spec = theirs.prepare_load(ready, ctx)  # type: ignore[arg-type]
                assert [int(i) for i in spec.block_ids] == ours.prepare_load(ready).block_ids, where  # type: ignore[attr-defined]
                for key in ready:
                    pinned[key] = pinned.get(key, 0) + 1
        elif op == "cload" and pinned:
            chosen = rng.sample(sorted(pinned), rng.randint(1, len(pinned)))
            theirs.complete_load(chosen, ctx)  # type: ignore[arg-type]
            ours.complete_load(chosen)
            for key in chosen:
                pinned[key] -= 1
                if not pinned[key]:
                    del pinned[key]
        elif op == "events":
            a = [(list(e.keys), e.removed, e.medium.value) for e in theirs.take_events()]
            b = [(e.block_hashes, e.removed, e.medium) for e in ours.take_events()]
            assert a == b, (where, a, b)
            assert ours.take_events() == [], where


def main() -> None:
    seeds = int(sys.argv[1])
    cores = [True, False] if OffloadingManager(1, block_size=1).native else [False]
    for policy in ("lru", "arc"):
        for native in cores:
            for events in (True, False):
                for seed in range(seeds):
                    run(seed, policy, native, events)
    print("ok")


if __name__ == "__main__":
    main()
