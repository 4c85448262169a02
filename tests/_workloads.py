"""Synthetic request traces of different prefix-sharing shapes, for policy tests.

Each generator returns requests as lists of chained block keys (a key always
follows the same prefix), seeded, so a test sees the same trace every run.
None of them is shaped after the bundled traces' statistics: they are the
textbook shapes a prefix cache meets.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


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


def prefix_tree(
    n: int,
    seed: int,
    *,
    roots: int = 20,
    skew: float = 1.0,
    root_blocks: int = 4,
    turns: float = 4.0,
    branching: int = 1,
    turn_blocks: tuple[int, int] = (1, 8),
    live: int = 50,
) -> list[list[int]]:
    """A family of prefix workloads, shaped by its knobs (none taken from a real trace).

    ``roots`` shared prefixes of ``root_blocks`` blocks (system prompts, documents),
    picked with Zipf popularity ``skew`` (0 = uniform). A request either starts a
    session on a root or continues one of the ``live`` most recent sessions; a
    session lasts ``turns`` turns on average (geometric). A turn extends one of
    the session's last ``branching`` turns (1 = a straight chat; more = edits and
    regenerations branching the tree) minus its partial last block, by
    ``turn_blocks`` new blocks.
    """
    rng = random.Random(seed)
    chains = _Chains()
    weights = [1 / (r + 1) ** skew for r in range(roots)]
    bases = [chains.extend([], [("root", r, j) for j in range(root_blocks)]) for r in range(roots)]
    sessions: list[list[list[int]]] = []  # each: its turns, newest last
    out: list[list[int]] = []
    end = 1.0 / max(turns, 1.0)
    tag = 0
    while len(out) < n:
        tag += 1
        grow = [("t", tag, j) for j in range(rng.randint(*turn_blocks))]
        if sessions and rng.random() < 1.0 - end:
            i = rng.randrange(len(sessions))
            history = sessions[i]
            prev = rng.choice(history[-branching:])
            turn = chains.extend(prev[:-1], grow)
            if rng.random() < end:
                sessions.pop(i)
            else:
                history.append(turn)
        else:
            base = bases[rng.choices(range(roots), weights)[0]]
            turn = chains.extend(base, grow)
            sessions.append([turn])
            if len(sessions) > live:
                sessions.pop(0)
        out.append(turn)
    return out


SHAPES: dict[str, dict[str, object]] = {
    "one root, short chats": {"roots": 1, "turns": 2.0},
    "one root, long chats": {"roots": 1, "turns": 12.0},
    "many roots, uniform": {"roots": 200, "skew": 0.0, "root_blocks": 12},
    "few hot roots, skewed": {"roots": 30, "skew": 1.5, "root_blocks": 20, "turns": 1.5},
    "bushy trees": {"roots": 10, "branching": 4, "turns": 8.0},
    "long turns, few sessions": {"roots": 5, "turn_blocks": (10, 40), "live": 8},
    "one-off requests": {"roots": 50, "turns": 1.0, "turn_blocks": (2, 30)},
    "many live sessions": {"roots": 3, "live": 400, "turns": 6.0},
}
"""Differently shaped :func:`prefix_tree` workloads: branching, session length,
reuse skew and request length each varied."""


def write_trace(path: Path, requests: list[list[int]]) -> Path:
    """``requests`` as a Mooncake JSONL trace at ``path`` (one request a line, in order)."""
    with open(path, "w") as f:
        for i, ids in enumerate(requests):
            record = {"timestamp": i, "input_length": 512 * len(ids), "output_length": 1}
            f.write(json.dumps({**record, "hash_ids": ids}) + "\n")
    return path
