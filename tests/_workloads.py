"""Synthetic request traces of different prefix-sharing shapes, for policy tests.

Each generator returns requests as lists of chained block keys (a key always
follows the same prefix), seeded, so a test sees the same trace every run.
None of them is shaped after the bundled traces' statistics: they are the
textbook shapes a prefix cache meets.
"""

from __future__ import annotations

import random


class _Chains:
    """Hands out chained keys: the child of ``(parent, label)`` is always the same key."""

    def __init__(self) -> None:
        self._child: dict[tuple[int, object], int] = {}

    def extend(self, prefix: list[int], labels: list[object]) -> list[int]:
        out = list(prefix)
        parent = out[-1] if out else -1
        for label in labels:
            key = self._child.setdefault((parent, label), len(self._child))
            out.append(key)
            parent = key
        return out


def chat(n: int, seed: int) -> list[list[int]]:
    """Multi-turn chat: a few system prompts; each session's turn extends the
    previous turn's prompt minus its partial last block; sessions end at random."""
    rng = random.Random(seed)
    chains = _Chains()
    systems = [chains.extend([], [("sys", s)] * 1) for s in range(3)]
    live: list[list[int]] = []
    out: list[list[int]] = []
    tag = 0
    while len(out) < n:
        if live and rng.random() < 0.6:
            i = rng.randrange(len(live))
            prev = live[i]
            tag += 1
            turn = chains.extend(prev[:-1], [("t", tag, j) for j in range(rng.randint(1, 6))])
            if rng.random() < 0.3:
                live.pop(i)
            else:
                live[i] = turn
        else:
            tag += 1
            base = rng.choice(systems)
            turn = chains.extend(base, [("t", tag, j) for j in range(rng.randint(2, 20))])
            live.append(turn)
            if len(live) > 40:
                live.pop(0)
        out.append(turn)
    return out


def documents(n: int, seed: int, docs: int = 60, skew: float = 1.1) -> list[list[int]]:
    """Document QA: Zipf-popular long documents, each request one document plus a
    unique question."""
    rng = random.Random(seed)
    chains = _Chains()
    weights = [1 / (d + 1) ** skew for d in range(docs)]
    lengths = [rng.randint(4, 40) for _ in range(docs)]
    out = []
    for i in range(n):
        d = rng.choices(range(docs), weights)[0]
        doc = chains.extend([], [("doc", d, j) for j in range(lengths[d])])
        out.append(chains.extend(doc, [("q", i, j) for j in range(rng.randint(1, 3))]))
    return out


def agents(n: int, seed: int) -> list[list[int]]:
    """Agent loops: a shared tool schema, then long tool-call histories that
    grow by a few blocks per step and restart now and then."""
    rng = random.Random(seed)
    chains = _Chains()
    schema = chains.extend([], [("schema", j) for j in range(8)])
    runs: list[list[int]] = []
    out = []
    tag = 0
    while len(out) < n:
        if not runs or rng.random() < 0.1:
            runs.append(list(schema))
            if len(runs) > 12:
                runs.pop(0)
        i = rng.randrange(len(runs))
        tag += 1
        runs[i] = chains.extend(runs[i], [("step", tag, j) for j in range(rng.randint(1, 4))])
        out.append(runs[i])
    return out


def scans(n: int, seed: int) -> list[list[int]]:
    """Reuse mixed with one-off scans: a small hot set of short prompts, and long
    unique documents read once."""
    rng = random.Random(seed)
    chains = _Chains()
    hot = [chains.extend([], [("hot", h, j) for j in range(3)]) for h in range(30)]
    out = []
    for i in range(n):
        if rng.random() < 0.5:
            out.append(rng.choice(hot))
        else:
            out.append(chains.extend([], [("scan", i, j) for j in range(rng.randint(10, 60))]))
    return out


WORKLOADS = {"chat": chat, "documents": documents, "agents": agents, "scans": scans}
