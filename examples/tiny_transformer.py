"""A tiny transformer that generates with paged attention over ``kvactors.paged``.

The model (random weights from a fixed seed, grouped-query attention, learned
positions) runs on the CPU. Its keys and values live in the paged KV tensors and
attention reads them through each request's block table. A small scheduler
serves prompts in families that share a long prefix, under a pool too small to
hold them all: idle prefix blocks are offloaded under memory pressure and loaded
back when a later prompt of the family arrives, running requests are swapped out
(preempted) when a decode step finds no free block and swapped back in later,
and the pool is defragmented every few steps.

The check: every logit vector of every step equals, bit for bit
(``torch.equal``), the one the same model computes with dense per-request K/V
tensors and no cache at all. The comparison is honest because every token goes
through the very same operations on tensors of the very same shapes in both
runs (one token per forward; keys and values read as a fresh contiguous
``[T, kv_heads, head_dim]`` tensor); only where the bytes were kept differs.

    python examples/tiny_transformer.py            # default size
    python examples/tiny_transformer.py --small    # what the tests run

The offloader is the in-package coordinator when ``kvactors.open`` exists, else
the small in-memory store below. The exit status is 1 if any logit differs.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import torch

import kvactors
from kvactors.cli.arguments import non_negative_int, positive_int
from kvactors.errors import BlockNotFoundError, OutOfBlocksError, TensorSpecError
from kvactors.keys import Key
from kvactors.paged import (
    KVCacheConfig,
    KVTensors,
    MemoryPressure,
    Offloader,
    PagedKVCache,
    SwappedOut,
)

# -- the model --------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    vocab: int = 256
    d_model: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    max_positions: int = 512


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)


class TinyTransformer:
    """Pre-norm decoder: grouped-query attention + GELU MLP, one token per forward."""

    def __init__(self, shape: ModelShape, seed: int) -> None:
        self.shape = s = shape
        g = torch.Generator().manual_seed(seed)

        def weight(rows: int, cols: int) -> torch.Tensor:
            return torch.randn(rows, cols, generator=g) / math.sqrt(rows)

        self.embed = torch.randn(s.vocab, s.d_model, generator=g)
        self.positions = 0.1 * torch.randn(s.max_positions, s.d_model, generator=g)
        self.blocks = [
            {
                "wq": weight(s.d_model, s.heads * s.head_dim),
                "wk": weight(s.d_model, s.kv_heads * s.head_dim),
                "wv": weight(s.d_model, s.kv_heads * s.head_dim),
                "wo": weight(s.heads * s.head_dim, s.d_model),
                "w1": weight(s.d_model, 4 * s.d_model),
                "w2": weight(4 * s.d_model, s.d_model),
            }
            for _ in range(s.layers)
        ]
        self.lm_head = weight(s.d_model, s.vocab)

    def forward(self, token: int, position: int, kv: Attention) -> torch.Tensor:
        """Logits after ``token`` at ``position``; writes its K/V through ``kv`` first."""
        s = self.shape
        x = (self.embed[token] + self.positions[position]).unsqueeze(0)
        for layer, w in enumerate(self.blocks):
            h = _rms_norm(x)
            q = (h @ w["wq"]).view(s.heads, s.head_dim)
            k = (h @ w["wk"]).view(s.kv_heads, s.head_dim)
            v = (h @ w["wv"]).view(s.kv_heads, s.head_dim)
            kv.write(layer, position, k, v)
            keys, values = kv.read(layer, position + 1)
            x = x + _attend(q, keys, values).view(1, -1) @ w["wo"]
            x = x + torch.nn.functional.gelu(_rms_norm(x) @ w["w1"]) @ w["w2"]
        return (_rms_norm(x) @ self.lm_head)[0]


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``q``: [heads, d]; ``keys`` / ``values``: [T, kv_heads, d] -> [heads, d]."""
    group = q.shape[0] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, T, d]
    values = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (keys @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(q.shape[-1])  # [heads, T]
    return (torch.softmax(scores, dim=-1).unsqueeze(1) @ values).squeeze(1)


class Attention:
    """Where one sequence's keys and values live."""

    def write(self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class DenseAttention(Attention):
    """The reference: one contiguous K and V tensor per layer, no paging, no cache."""

    def __init__(self, shape: ModelShape) -> None:
        size = (shape.max_positions, shape.kv_heads, shape.head_dim)
        self.k = [torch.zeros(size) for _ in range(shape.layers)]
        self.v = [torch.zeros(size) for _ in range(shape.layers)]

    def write(self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][position] = k
        self.v[layer][position] = v

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:length].clone(), self.v[layer][:length].clone()


class PagedAttention(Attention):
    """Keys and values in the paged tensors, found through the request's block table."""

    def __init__(self, kv: KVTensors, block_ids: Sequence[int]) -> None:
        self.kv = kv
        self.table = torch.tensor(list(block_ids), dtype=torch.long)
        self.block_size = kv.config.block_size

    def write(self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        block, offset = int(self.table[position // self.block_size]), position % self.block_size
        self.kv.key_cache(layer)[block, offset] = k
        self.kv.value_cache(layer)[block, offset] = v

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length)
        blocks = self.table[positions // self.block_size]
        offsets = positions % self.block_size
        return (
            self.kv.key_cache(layer)[blocks, offsets],
            self.kv.value_cache(layer)[blocks, offsets],
        )


# -- the workload -----------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    shape: ModelShape = ModelShape()
    seed: int = 0
    block_size: int = 4
    gpu_blocks: int = 32
    watermark: float = 0.25
    families: int = 3
    prompts_per_family: int = 3
    prefix: int = 32
    suffix: tuple[int, int] = (3, 9)
    generate: int = 16
    max_running: int = 3
    defrag_every: int = 7


def make_prompts(opts: Options) -> list[tuple[str, list[int]]]:
    """Families of prompts sharing a prefix; arrival order interleaves the families."""
    g = torch.Generator().manual_seed(opts.seed + 1)
    vocab = opts.shape.vocab

    def tokens(n: int) -> list[int]:
        return [int(t) for t in torch.randint(vocab, (n,), generator=g)]

    prefixes = [tokens(opts.prefix) for _ in range(opts.families)]
    prompts = []
    for i in range(opts.prompts_per_family):
        for f, prefix in enumerate(prefixes):
            n = int(torch.randint(opts.suffix[0], opts.suffix[1] + 1, (1,), generator=g))
            prompts.append((f"{chr(ord('A') + f)}{i}", prefix + tokens(n)))
    return prompts


def reference(model: TinyTransformer, prompt: list[int], generate: int) -> list[torch.Tensor]:
    """Greedy generation with dense attention: the logits of every step."""
    kv = DenseAttention(model.shape)
    logits = [model.forward(t, p, kv) for p, t in enumerate(prompt)][-1:]
    tokens = list(prompt)
    while len(logits) < generate:
        tokens.append(int(logits[-1].argmax()))
        logits.append(model.forward(tokens[-1], len(tokens) - 1, kv))
    return logits


@dataclass
class Request:
    rid: str
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)  # tokens whose K/V are in the cache
    logits: list[torch.Tensor] = field(default_factory=list)
    shared: int = 0  # prompt tokens shared with blocks in the pool
    loaded: int = 0  # prompt tokens loaded from the offloader
    swapped_in: int = 0  # tokens loaded back by swap-ins
    computed: int = 0  # tokens the model ran (prefill, decode, recompute)
    swaps: int = 0


@dataclass
class Result:
    requests: list[Request]
    expected: dict[str, list[torch.Tensor]]
    counters: dict[str, int]
    offloader: str

    def mismatches(self) -> list[str]:
        bad = []
        for r in self.requests:
            want = self.expected[r.rid]
            if len(r.logits) != len(want) or not all(
                torch.equal(a, b) for a, b in zip(r.logits, want, strict=True)
            ):
                bad.append(r.rid)
        return bad


class Engine:
    """Admits prompts, decodes one token per running request per step, preempts by swapping."""

    def __init__(self, model: TinyTransformer, cache: PagedKVCache, opts: Options) -> None:
        self.model = model
        self.cache = cache
        self.opts = opts
        self.running: list[Request] = []
        self.swapped: deque[tuple[Request, SwappedOut]] = deque()
        self.counters = {"swap_outs": 0, "defragments": 0, "moved_blocks": 0, "steps": 0}

    def _compute(self, req: Request, start: int) -> torch.Tensor | None:
        """Run the model over ``req.tokens[start:]``; the last logits."""
        table = self.cache.allocator.get_block_table(req.rid)
        attn = PagedAttention(self.cache.kv, table.block_ids)
        logits = None
        for pos in range(start, len(req.tokens)):
            logits = self.model.forward(req.tokens[pos], pos, attn)
        req.computed += len(req.tokens) - start
        return logits

    async def _admit(self, waiting: deque[Request]) -> None:
        while len(self.running) < self.opts.max_running and (self.swapped or waiting):
            try:
                if self.swapped:
                    req, out = self.swapped[0]
                    got = await self.cache.swap_in(out)
                    self.swapped.popleft()
                    req.swapped_in += got.num_loaded_tokens
                    self._compute(req, got.num_cached_tokens)  # what the offloader lost
                else:
                    req = waiting[0]
                    got = await self.cache.allocate(req.rid, req.prompt)
                    waiting.popleft()
                    req.tokens = list(req.prompt)
                    req.shared = got.num_cached_tokens - got.num_loaded_tokens
                    req.loaded = got.num_loaded_tokens
                    logits = self._compute(req, got.num_cached_tokens)
                    assert logits is not None  # the last token is always computed
                    req.logits.append(logits)
            except OutOfBlocksError:
                return
            self.running.append(req)

    async def _decode(self, req: Request) -> None:
        token = int(req.logits[-1].argmax())
        while True:
            try:
                await self.cache.extend(req.rid, [token])
                break
            except OutOfBlocksError:
                victim = self.running[-1]
                if victim is req and len(self.running) == 1:
                    raise
                self.running.remove(victim)
                self.swapped.append((victim, await self.cache.swap_out(victim.rid)))
                victim.swaps += 1
                self.counters["swap_outs"] += 1
                if victim is req:
                    return
        req.tokens.append(token)
        logits = self._compute(req, len(req.tokens) - 1)
        assert logits is not None
        req.logits.append(logits)

    async def serve(self, prompts: list[tuple[str, list[int]]]) -> list[Request]:
        waiting = deque(Request(rid, prompt) for rid, prompt in prompts)
        done: list[Request] = []
        while waiting or self.running or self.swapped:
            await self._admit(waiting)
            if not self.running:
                raise OutOfBlocksError("the pool cannot hold a single request")
            for req in list(self.running):
                if req in self.running and len(req.logits) < self.opts.generate:
                    await self._decode(req)
            for req in [r for r in self.running if len(r.logits) >= self.opts.generate]:
                self.cache.free(req.rid)
                self.running.remove(req)
                done.append(req)
            self.counters["steps"] += 1
            if self.opts.defrag_every and self.counters["steps"] % self.opts.defrag_every == 0:
                moved = self.cache.defragment()
                self.counters["defragments"] += 1
                self.counters["moved_blocks"] += len(moved)
        return sorted(done, key=lambda r: r.rid)


def cache_config(opts: Options) -> KVCacheConfig:
    s = opts.shape
    return KVCacheConfig(
        num_layers=s.layers,
        num_kv_heads=s.kv_heads,
        head_dim=s.head_dim,
        dtype="float32",
        block_size=opts.block_size,
        num_gpu_blocks=opts.gpu_blocks,
        watermark=opts.watermark,
        namespace=f"tiny-transformer/seed={opts.seed}",
    )


async def run(opts: Options, offloader: Offloader) -> Result:
    """Serve the workload through ``offloader`` and compute the dense reference."""
    model = TinyTransformer(opts.shape, opts.seed)
    prompts = make_prompts(opts)
    cache = PagedKVCache(cache_config(opts), offloader)
    pressure: list[MemoryPressure] = []
    cache.allocator.add_pressure_callback(pressure.append)
    engine = Engine(model, cache, opts)
    requests = await engine.serve(prompts)
    expected = {rid: reference(model, prompt, opts.generate) for rid, prompt in prompts}
    stats = cache.stats()
    counters = {
        "pressure_events": len(pressure),
        "offload_blocks_stored": stats.stored_blocks,
        "offload_blocks_loaded": stats.loaded_blocks,
        "blocks_evicted": stats.allocator.evicted_blocks,
        "store_failures": stats.store_failures,
        "load_failures": stats.load_failures,
        **engine.counters,
    }
    return Result(requests, expected, counters, type(offloader).__name__)


# -- the offloader ----------------------------------------------------------------


class InMemoryOffloader:
    """A dict of rows, least recently stored dropped beyond ``capacity`` rows."""

    def __init__(self, row_bytes: int, capacity: int = 1 << 16) -> None:
        self.row_bytes = row_bytes
        self.capacity = capacity
        self.rows: OrderedDict[Key, torch.Tensor] = OrderedDict()

    async def lookup(self, keys: Sequence[Key]) -> int:
        await anyio.lowlevel.checkpoint()
        hits = 0
        while hits < len(keys) and keys[hits] in self.rows:
            hits += 1
        return hits

    async def store(self, keys: Sequence[Key], src: torch.Tensor) -> int:
        if tuple(src.shape) != (len(keys), self.row_bytes):
            raise TensorSpecError(f"store: expected ({len(keys)}, {self.row_bytes}) rows")
        await anyio.lowlevel.checkpoint()
        stored = 0
        for key, row in zip(keys, src, strict=True):
            if key not in self.rows:
                self.rows[key] = row.clone()
                stored += 1
        while len(self.rows) > self.capacity:
            self.rows.popitem(last=False)
        return stored

    async def load(self, keys: Sequence[Key], dst: torch.Tensor) -> None:
        for key in keys:
            if key not in self.rows:
                raise BlockNotFoundError(f"load: block key {key!r} is not stored")
        await anyio.lowlevel.checkpoint()
        for i, key in enumerate(keys):
            dst[i] = self.rows[key]


@asynccontextmanager
async def default_offloader(opts: Options) -> AsyncIterator[Offloader]:
    """The coordinator (CPU tier only) when the package has one, else ``InMemoryOffloader``."""
    config = cache_config(opts)
    open_cache: Any = getattr(kvactors, "open", None)
    if open_cache is None:
        yield InMemoryOffloader(config.offload_bytes)
        return
    from kvactors.config import Config, GPUConfig, TierConfig

    tiers = Config(
        block_bytes=config.offload_bytes,
        gpu=GPUConfig(num_blocks=1, device="cpu"),
        cpu=TierConfig(num_blocks=4096),
        nvme=None,
    )
    async with open_cache(tiers) as kv:
        yield kv


# -- the command line -------------------------------------------------------------


SMALL = Options(
    shape=ModelShape(vocab=64, d_model=32, layers=2, heads=4, kv_heads=2, head_dim=8),
    block_size=4,
    gpu_blocks=16,
    prefix=16,
    suffix=(2, 5),
    families=3,
    prompts_per_family=2,
    generate=8,
    max_running=3,
    defrag_every=3,
)


SEEDS = range(-(2**63), 2**63 - 1)
"""The seeds torch's generators take, leaving room for the prompts' ``seed + 1``."""


def seed_int(text: str) -> int:
    """argparse type of ``--seed``: an int in :data:`SEEDS`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int: {text!r}") from None
    if value not in SEEDS:
        raise argparse.ArgumentTypeError(f"must be in {SEEDS.start}..{SEEDS.stop - 1}, got {text}")
    return value


def parse_options(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="the size the tests run")
    p.add_argument("--seed", type=seed_int, help=f"an int in {SEEDS.start}..{SEEDS.stop - 1}")
    p.add_argument("--layers", type=positive_int)
    p.add_argument("--d-model", type=positive_int)
    p.add_argument("--heads", type=positive_int, help="query heads (a multiple of --kv-heads)")
    p.add_argument("--kv-heads", type=positive_int)
    p.add_argument("--head-dim", type=positive_int)
    p.add_argument("--block-size", type=positive_int)
    p.add_argument("--gpu-blocks", type=positive_int, help="blocks in the pool")
    p.add_argument("--families", type=positive_int, help="groups of prompts sharing a prefix")
    p.add_argument("--prompts-per-family", type=positive_int)
    p.add_argument("--prefix", type=non_negative_int, help="tokens of the shared prefix")
    p.add_argument("--generate", type=positive_int, help="tokens generated per prompt")
    p.add_argument("--max-running", type=positive_int)
    p.add_argument(
        "--defrag-every", type=non_negative_int, help="defragment every N steps (0: never)"
    )
    args = p.parse_args(argv)
    opts = SMALL if args.small else Options()
    shape = {
        "layers": args.layers,
        "d_model": args.d_model,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
    }
    shape_changes = {k: v for k, v in shape.items() if v is not None}
    top = {
        "seed": args.seed,
        "block_size": args.block_size,
        "gpu_blocks": args.gpu_blocks,
        "families": args.families,
        "prompts_per_family": args.prompts_per_family,
        "prefix": args.prefix,
        "generate": args.generate,
        "max_running": args.max_running,
        "defrag_every": args.defrag_every,
    }
    changes: dict[str, Any] = {k: v for k, v in top.items() if v is not None}
    if shape_changes:
        changes["shape"] = ModelShape(**{**opts.shape.__dict__, **shape_changes})
    opts = Options(**{**opts.__dict__, **changes})
    shape = opts.shape
    if shape.heads % shape.kv_heads:
        p.error(f"--heads {shape.heads} is not a multiple of --kv-heads {shape.kv_heads}")
    # The longest request: the prefix, the longest suffix and every generated token
    # but the last (which is never fed back through the model).
    longest = opts.prefix + opts.suffix[1] + opts.generate
    if longest > shape.max_positions:
        p.error(
            f"a request of up to {longest} tokens (--prefix + {opts.suffix[1]} + --generate) "
            f"is longer than the model's {shape.max_positions} positions"
        )
    needed = -(-(longest - 1) // opts.block_size)
    if opts.gpu_blocks < needed:
        p.error(
            f"--gpu-blocks {opts.gpu_blocks} cannot hold one request of up to {longest} "
            f"tokens: it needs {needed} blocks of {opts.block_size} tokens"
        )
    return opts


def report(result: Result) -> str:
    bad = set(result.mismatches())
    lines = [
        f"{'request':<8} {'prompt':>6} {'shared':>6} {'loaded':>6} {'swaps':>5} "
        f"{'swapped in':>10} {'computed':>8} {'steps':>5}  logits",
    ]
    for r in result.requests:
        verdict = "DIFFER" if r.rid in bad else "equal"
        lines.append(
            f"{r.rid:<8} {len(r.prompt):>6} {r.shared:>6} {r.loaded:>6} {r.swaps:>5} "
            f"{r.swapped_in:>10} {r.computed:>8} {len(r.logits):>5}  {verdict}"
        )
    lines.append("")
    lines.append(f"{'offloader':<22} {result.offloader}")
    lines += [f"{name:<22} {value}" for name, value in result.counters.items()]
    return "\n".join(lines)


async def amain(opts: Options, offloader: Offloader | None = None) -> Result:
    if offloader is not None:
        return await run(opts, offloader)
    async with default_offloader(opts) as default:
        return await run(opts, default)


def main(argv: Sequence[str] | None = None, offloader: Offloader | None = None) -> int:
    """Run the example; 0 if every logit equals the reference, else 1.

    ``offloader``: where offloaded blocks go (default: see ``default_offloader``).
    """
    opts = parse_options(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to thread hand-offs
    try:
        result = anyio.run(amain, opts, offloader)
    finally:
        torch.set_num_threads(threads)
    print(report(result))
    bad = result.mismatches()
    if bad:
        print(f"MISMATCH: logits differ from the dense reference for {', '.join(bad)}")
        return 1
    print("all logits equal the dense reference bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
