"""Promises of README.md and docs/*.md that no other test checks, one test each.

Each test names the sentence it holds the code to; bad inputs must raise the
typed error the docs name (root ``KVActorsError``) with nothing changed.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import torch

import kvactors
from _docs import doc_block, doc_table
from kvactors import OffloadingManager
from kvactors.cli import main
from kvactors.config import MetricsConfig, RemoteConfig
from kvactors.errors import (
    ActorClosed,
    BlockNotFoundError,
    CacheLockedError,
    ConfigError,
    InvalidKeyError,
    StoreOpenError,
    TensorSpecError,
    UnknownPolicyError,
)
from kvactors.media import resolve_device

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
BB = 4096


def small(**changes: Any) -> kvactors.Config:
    base: dict[str, Any] = {
        "block_bytes": BB,
        "gpu": kvactors.GPUConfig(num_blocks=8, device="cpu"),
        "cpu": kvactors.TierConfig(num_blocks=8),
        "nvme": None,
    }
    base.update(changes)
    return kvactors.Config(**base)


# --- docs/api.md: Configuration ------------------------------------------------


def test_api_md_config_example_is_the_defaults() -> None:
    """docs/api.md's TOML example lists every default (but the example directory)."""
    data = tomllib.loads(doc_block(ROOT / "docs" / "api.md", "toml", "block_bytes"))
    data["nvme"].pop("directory")
    assert kvactors.Config.from_dict(data) == kvactors.Config()


def test_api_md_config_example_names_every_key() -> None:
    """Every key of Config, [gpu], [cpu] and [nvme] appears in docs/api.md's example."""
    data = tomllib.loads(doc_block(ROOT / "docs" / "api.md", "toml", "block_bytes"))
    config = kvactors.Config()
    skip = {"remote", "metrics", "gpu", "cpu", "nvme"}  # sub-tables; remote: docs/remote.md
    assert set(config.__struct_fields__) - skip <= set(data)
    for table in ("gpu", "cpu", "nvme"):
        assert set(getattr(config, table).__struct_fields__) == set(data[table]), table


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"cpu": {"num_blocks": 0}}, "cpu.num_blocks"),
        ({"cpu": {"num_blocks": -4}}, "cpu.num_blocks"),
        ({"cpu": {"num_blocks": "4"}}, "cpu.num_blocks"),
        ({"cpu": {"num_blocks": 2**31}}, "cpu.num_blocks"),
        ({"gpu": {"num_blocks": 1.5}}, "gpu.num_blocks"),
        ({"block_bytes": 0}, "block_bytes"),
        ({"event_buffer": -1}, "event_buffer"),
        ({"inline_bytes": 8 << 20}, "inline_bytes"),
        ({"inline_bytes": -1}, "inline_bytes"),
        ({"write_mode": "sometimes"}, "write_mode"),
        ({"nvme": {"backend": "gds"}}, "nvme.backend"),
        ({"nvme": {"io": "odirect"}}, "nvme.io"),
        ({"nvme": {"stripes": 0}}, "nvme.stripes"),
        ({"mailbox_size": 0}, "mailbox_size"),
        ({"max_inflight": 0}, "max_inflight"),
        ({"max_inflight": 2**40}, "max_inflight"),
        ({"cpu": {"threads": 2**40}}, "cpu.threads"),
        ({"nvme": {"threads": 5000}}, "nvme.threads"),
        ({"nvme": {"stripes": 2**40}}, "nvme.stripes"),
        ({"move_bytes": "yes"}, "move_bytes"),
        ({"gpu": {"device": "cuda:x"}}, "gpu.device"),
        ({"gpu": {"device": "cuda:"}}, "gpu.device"),
        ({"gpu": {"device": "tpu"}}, "gpu.device"),
        ({"nvme": {"directory": ""}}, "nvme.directory"),
        ({"nvme": {"directory": " "}}, "nvme.directory"),
        ({"cpu": {"colour": "red"}}, "colour"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_wrong_config_values_raise_config_error_naming_the_field(
    data: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        kvactors.Config.from_dict(data)


@pytest.mark.parametrize(
    ("data", "start"),
    [
        ({"colour": 1}, "colour: unknown key; known: block_bytes, gpu, cpu, nvme, write_mode"),
        ({"tiers": {"cpu": {}}}, "tiers: unknown key; known: block_bytes"),
        ({"cpu": {"colour": 1}}, "cpu.colour: unknown key; known: num_blocks, policy, threads"),
        ({"nvme": {"path": "/x"}}, "nvme.path: unknown key; known: num_blocks, policy, directory"),
        ({"remote": {"url": "redis://h", "host": "h"}}, "remote.host: unknown key; known: url"),
        ({"metrics": {"x": 1}}, "metrics.x: unknown key; known: port, host"),
    ],
)
def test_an_unknown_key_is_named_by_its_path_with_the_keys_there(
    data: dict[str, Any], start: str, tmp_path: Path
) -> None:
    """docs/api.md: every wrong value, an unknown key (a typo, a key of another
    section or layout) too, raises ConfigError naming it by its path, and lists
    the keys that section has (the message said ``cpu: Object contains unknown
    field `colour```)."""
    with pytest.raises(ConfigError, match=f"^invalid config: {re.escape(start)}"):
        kvactors.Config.from_dict(data)


@pytest.mark.parametrize(
    ("data", "start"),
    [
        ({"nvme": {"directory": ""}}, "nvme.directory: empty"),
        ({"cpu": {"num_blocks": 0}}, "cpu.num_blocks: Expected `int` >= 1"),
        ({"remote": {"url": "redis://h", "ttl": -1}}, "remote.ttl: expected seconds > 0"),
        ({"remote": {"url": "redis://h", "timeout": 0.0}}, "remote.timeout: expected"),
        ({"remote": {"url": "http://h"}}, "remote.url: expected redis://"),
        ({"remote": {"nodes": ["h"]}}, "remote.nodes: expected 'host:port'"),
        ({"remote": {"url": "redis://h", "namespace": ""}}, "remote.namespace: expected"),
        ({"metrics": {"port": 2**20}}, "metrics.port: Expected `int` <= 65535"),
    ],
)
def test_a_section_s_wrong_value_is_named_by_its_dotted_path(
    data: dict[str, Any], start: str
) -> None:
    """docs/api.md: a loaded config's error names the field by its path: a
    section's own checks (an empty directory, seconds) too, not the bare field."""
    with pytest.raises(ConfigError, match=f"^invalid config: {re.escape(start)}"):
        kvactors.Config.from_dict(data)


@pytest.mark.parametrize(
    "device", ["cuda:01", "cuda:00", "cuda:+1", "cuda: 1", "cuda:1x", "cuda:\u0663", "CUDA"]
)
def test_a_device_that_is_not_auto_cpu_cuda_or_cuda_n_names_gpu_device(device: str) -> None:
    """docs/api.md: ``gpu.device`` is "auto", "cpu", "cuda" or "cuda:N" (N as torch
    writes it); anything else is a ConfigError naming it, loaded or made in
    Python, and at open, before CUDA is asked whether it is there."""
    want = f"gpu.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
    with pytest.raises(ConfigError, match=f"^invalid config: {re.escape(want)}$"):
        kvactors.Config.from_dict({"gpu": {"device": device}})
    with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):
        kvactors.Config(gpu=kvactors.GPUConfig(device=device))
    with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):
        resolve_device(device)
    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:10"):
        assert kvactors.Config(gpu=kvactors.GPUConfig(device=good)).gpu.device == good


def test_an_empty_nvme_directory_is_an_error_not_the_working_directory() -> None:
    with pytest.raises(ConfigError, match="directory: empty"):
        kvactors.NVMeConfig(directory="")
    assert kvactors.Config.from_dict({"gpu": {"device": "cuda:1"}}).gpu.device == "cuda:1"


@pytest.mark.parametrize("directory", ["/tmp/kv\x00x", "\x00", "kv\ud800"])
def test_an_nvme_directory_the_os_cannot_name_is_a_config_error(
    directory: str, tmp_path: Path
) -> None:
    """docs/api.md: ``nvme.directory`` is a path the OS can take (no NUL byte, no
    lone surrogate): a ConfigError naming it when the config is made or loaded,
    not a bare ValueError / UnicodeEncodeError from the open."""
    with pytest.raises(ConfigError, match=r"^invalid config: nvme\.directory: not a path"):
        kvactors.Config.from_dict({"nvme": {"directory": directory}})
    with pytest.raises(ConfigError, match=r"^directory: not a path"):
        kvactors.NVMeConfig(directory=directory)
    with pytest.raises(ConfigError, match=r"^invalid config: nvme\.directory: not a path"):
        kvactors.Config().replace(nvme={"directory": directory})
    if "\x00" in directory:  # TOML can write a NUL (\u0000), not a lone surrogate
        path = tmp_path / "kv.toml"
        path.write_text('[nvme]\ndirectory = "/tmp/kv\\u0000x"\n')
        with pytest.raises(ConfigError, match=r"^invalid config: nvme\.directory: not a path"):
            kvactors.Config.from_toml(path)
    # A name the OS takes, non-ASCII and undecodable bytes (surrogateescape) included.
    for good in ("/tmp/k\u00e9v", "/tmp/kv\udc80"):
        assert kvactors.NVMeConfig(directory=good).directory == good


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: kvactors.Config(write_mode="sometimes"), "write_mode"),
        (lambda: kvactors.Config(move_bytes="yes"), "move_bytes"),
        (lambda: kvactors.Config(cpu={"num_blocks": 4}), "cpu: expected TierConfig"),
        (lambda: kvactors.Config(nvme={"num_blocks": 4}), "nvme: expected NVMeConfig or None"),
        (lambda: kvactors.GPUConfig(device=3), "device"),
        (lambda: kvactors.TierConfig(policy=["lru"]), "policy"),
        (lambda: kvactors.NVMeConfig(directory=3), "directory"),
        (lambda: kvactors.NVMeConfig(io="odirect"), "io"),
        (lambda: RemoteConfig(cluster="yes"), "cluster"),
        (lambda: MetricsConfig(host=3), "host"),
    ],
)
def test_wrong_values_made_directly_raise_config_error_naming_the_field(
    make: Any, field: str
) -> None:
    """docs/api.md: every wrong value raises ConfigError, also when the struct is made in Python."""
    with pytest.raises(ConfigError, match=f"^{re.escape(field)}"):
        make()


def test_a_section_that_may_be_none_is_turned_off_with_false_in_toml(tmp_path: Path) -> None:
    """docs/api.md: TOML has no null, so ``nvme = false`` (also ``remote``,
    ``metrics``) runs without that section; left out, [nvme] is its defaults;
    ``true`` is a ConfigError naming the section."""
    path = tmp_path / "kv.toml"
    path.write_text("block_bytes = 4096\nnvme = false\nremote = false\nmetrics = false\n")
    config = kvactors.Config.from_toml(path)
    assert (config.nvme, config.remote, config.metrics) == (None, None, None)
    assert [name for name, _ in config.chain()] == ["cpu"]
    path.write_text("block_bytes = 4096\n")
    assert kvactors.Config.from_toml(path).nvme == kvactors.NVMeConfig()
    assert kvactors.Config().replace(nvme=False).nvme is None
    for section in ("nvme", "remote", "metrics"):
        with pytest.raises(ConfigError, match=f"^invalid config: {section}: expected a table"):
            kvactors.Config.from_dict({section: True})
    with pytest.raises(ConfigError, match=r"^invalid config: cpu: Expected `object`"):
        kvactors.Config.from_dict({"cpu": False})  # the CPU tier cannot be turned off


def test_replace_with_a_value_no_field_holds_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^invalid config: block_bytes: "):
        kvactors.Config().replace(block_bytes=object())
    with pytest.raises(ConfigError, match="colour"):
        kvactors.Config().replace(colour=1)
    assert kvactors.Config().replace(nvme=None, block_bytes=4096).block_bytes == 4096


def test_unknown_policy_name_in_config_is_typed() -> None:
    with pytest.raises(UnknownPolicyError, match=r"cpu\.policy.*lru"):
        kvactors.Config.from_dict({"cpu": {"policy": "mru"}})
    with pytest.raises(UnknownPolicyError, match=r"nvme\.policy"):
        kvactors.Config(nvme=kvactors.NVMeConfig(policy="mru"))


def test_from_toml_bad_files_raise_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("block_bytes = = 3\n")
    with pytest.raises(ConfigError):
        kvactors.Config.from_toml(bad)
    with pytest.raises(ConfigError):
        kvactors.Config.from_toml(tmp_path / "missing.toml")
    with pytest.raises(ConfigError):
        kvactors.Config.from_toml(tmp_path)  # a directory
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"model = '\xe9'\n")  # not UTF-8
    with pytest.raises(ConfigError, match="not valid TOML"):
        kvactors.Config.from_toml(latin)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[cpu]\nnum_blocks = 4\nsize = 3\n")
    with pytest.raises(ConfigError, match="size"):
        kvactors.Config.from_toml(unknown)
    # A path no file can have is a ConfigError too (was ValueError /
    # UnicodeEncodeError), and an int is not taken as a file descriptor.
    for bad_path in (str(tmp_path / "kv\x00.toml"), str(tmp_path / "kv\ud800.toml")):
        with pytest.raises(ConfigError, match=r"^cannot read config .*not a path"):
            kvactors.Config.from_toml(bad_path)
    read, write = os.pipe()
    try:
        os.write(write, b"block_bytes = 4096\n")
        for not_a_path in (read, None, 1.5):
            with pytest.raises(ConfigError, match=r"^from_toml: expected a path"):
                kvactors.Config.from_toml(not_a_path)  # type: ignore[arg-type]
        os.fstat(read)  # still open: never read as a config, nor closed
    finally:
        os.close(read)
        os.close(write)


@pytest.mark.anyio
async def test_direct_io_needs_4096_byte_blocks(tmp_path: Path) -> None:
    """docs/api.md: nvme.io = "direct" with blocks not a multiple of 4096 raises naming nvme.io."""
    nvme = kvactors.NVMeConfig(num_blocks=8, directory=str(tmp_path / "kv"), io="direct")
    config = small(nvme=nvme).replace(block_bytes=1000)
    with anyio.fail_after(30), pytest.raises(ConfigError, match=re.escape("nvme.io")):
        async with kvactors.open(config):
            pass


# --- docs/api.md: open, calls, argument checks -------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("config", ["kv.toml", {"block_bytes": 64}, 0])
async def test_open_of_anything_but_a_config_is_a_config_error(config: Any) -> None:
    with anyio.fail_after(30), pytest.raises(ConfigError, match=r"expected a kvactors\.Config"):
        async with kvactors.open(config):
            pass


@pytest.mark.anyio
async def test_too_large_pool_raises_config_error_before_allocating() -> None:
    config = small(cpu=kvactors.TierConfig(num_blocks=2**31 - 1))
    config = config.replace(block_bytes=1 << 20)
    with anyio.fail_after(30), pytest.raises(ConfigError, match=re.escape("cpu.num_blocks")):
        async with kvactors.open(config):
            pass


def test_api_md_errors_table_names_real_errors_and_their_bases() -> None:
    """docs/api.md, Errors: every error the table names is a class of
    kvactors.errors under KVActorsError, and the kinds it states hold."""
    from kvactors import errors

    rows = doc_table(ROOT / "docs" / "api.md", "| error | when |")
    named = set()
    for cell, _ in rows:
        names = re.findall(r"`(\w+)`", cell)
        for name in names:
            cls = getattr(errors, name)
            assert issubclass(cls, errors.KVActorsError), name
            named.add(name)
        # "`A` (a `B`)": A is a kind of B; "`A` (`B`)": B is a kind of A.
        kinds = re.search(r"^`(\w+)` \((an? )?`(\w+)`\)$", cell)
        if kinds is not None:
            first, second = getattr(errors, kinds[1]), getattr(errors, kinds[3])
            assert issubclass(first, second) if kinds[2] else issubclass(second, first), cell
    assert {"StoreOpenError", "IndexDamagedError", "CacheLockedError", "ConfigError"} <= named


@pytest.mark.anyio
async def test_what_this_machine_lacks_is_a_config_error_naming_the_field_at_open() -> None:
    """docs/api.md, Errors: ConfigError at open for what depends on the machine:
    a CUDA gpu.device without CUDA, nvme.backend = "kvikio" without kvikio."""
    from kvactors.media.kvikio_io import kvikio_available

    cases = []
    if not torch.cuda.is_available():
        cases += [(small(gpu=kvactors.GPUConfig(num_blocks=8, device=d)), "gpu.device")
                  for d in ("cuda", "cuda:1")]  # fmt: skip
    if not kvikio_available():
        nvme = kvactors.NVMeConfig(num_blocks=8, backend="kvikio")
        cases.append((small(nvme=nvme), "nvme.backend"))
    if not cases:
        pytest.skip("CUDA and kvikio are both here")
    for config, field in cases:
        with anyio.fail_after(30), pytest.raises(ConfigError, match=f"^{re.escape(field)}: "):
            async with kvactors.open(config):
                pass


@pytest.mark.anyio
async def test_nvme_directory_that_is_a_file_raises_typed(tmp_path: Path) -> None:
    path = tmp_path / "afile"
    path.write_bytes(b"x")
    config = small(nvme=kvactors.NVMeConfig(num_blocks=8, directory=str(path)))
    with anyio.fail_after(30), pytest.raises(StoreOpenError, match="afile"):
        async with kvactors.open(config):
            pass
    assert path.read_bytes() == b"x"


@pytest.mark.anyio
async def test_a_directory_in_use_raises_cache_locked(tmp_path: Path) -> None:
    config = small(nvme=kvactors.NVMeConfig(num_blocks=8, directory=str(tmp_path / "kv")))
    with anyio.fail_after(30):
        async with kvactors.open(config) as kv:
            await kv.store([b"a"], [0])
            with pytest.raises(CacheLockedError):
                async with kvactors.open(config):
                    pass
            assert (await kv.lookup([b"a"])).hits == 1
        bigger = config.replace(
            nvme={"num_blocks": 8, "directory": str(tmp_path / "kv"), "stripes": 3}
        )
        with pytest.raises(ConfigError, match=re.escape("nvme.stripes")):
            async with kvactors.open(bigger):
                pass


@pytest.mark.anyio
async def test_durable_lists_only_keys_on_a_named_nvme_directory(tmp_path: Path) -> None:
    """docs/api.md "What a store result promises"."""
    named = kvactors.NVMeConfig(num_blocks=8, directory=str(tmp_path / "kv"))
    with anyio.fail_after(60):
        async with kvactors.open(small(nvme=named)) as kv:
            res = await kv.store([b"a"], [0])
            assert res is not None
            assert res.durable == []
        async with kvactors.open(small(nvme=named, write_mode="write_through")) as kv:
            res = await kv.store([b"b", b"c"], [0, 1])
            assert res is not None
            assert res.durable == [b"b", b"c"]
        async with kvactors.open(small(nvme=named)) as kv:
            assert (await kv.lookup([b"b", b"c"])).hits == 2  # survived the restart
            again = await kv.store([b"b"], [0])
            assert again is not None
            assert again.present == 1
            assert again.durable == [b"b"]
        temp = kvactors.NVMeConfig(num_blocks=8)
        async with kvactors.open(small(nvme=temp, write_mode="write_through")) as kv:
            res = await kv.store([b"a"], [0])
            assert res is not None
            assert res.durable == []


@pytest.mark.anyio
async def test_call_return_types_and_medium() -> None:
    """docs/api.md's table of calls: what each returns."""
    with anyio.fail_after(30):
        async with kvactors.open(small()) as kv:
            keys = [b"a", b"b", 3]
            kv.gpu_pool.write_rows([0, 1, 2], torch.full((3, BB), 7, dtype=torch.uint8))
            res = await kv.store(keys, [0, 1, 2])
            assert isinstance(res, kvactors.StoreResult)
            assert (res.stored, res.present, res.durable) == (3, 0, [])
            again = await kv.store(keys, range(3))
            assert again is not None
            assert (again.stored, again.present) == (0, 3)
            hit = await kv.lookup([*keys, b"z"])
            assert isinstance(hit, kvactors.LookupResult)
            assert hit.hits == 3
            assert hit.tiers == ["cpu"] * 3
            got = await kv.load(keys, (5, 6, 7))
            assert isinstance(got, kvactors.LoadResult)
            assert got.tiers == ["cpu"] * 3
            assert torch.equal(kv.gpu_pool.rows([5, 6, 7]), kv.gpu_pool.rows([0, 1, 2]))
            part = await kv.load([b"a", b"zz", b"b"], [4, 5, 6], partial=True)
            assert part.tiers == ["cpu"]
            assert isinstance(kv.prefetch([b"a"]), bool)
            fut = kv.submit_load([b"a"], [3])
            assert isinstance(fut, kvactors.Future)
            assert isinstance(await fut, kvactors.LoadResult)
            assert fut.done()
            assert fut.exception() is None
            assert isinstance(fut.result(), kvactors.LoadResult)
            stats = await kv.stats()
            assert isinstance(stats, kvactors.CacheStats)
            assert kv.medium("cpu") is not None
            with pytest.raises(KeyError):
                kv.medium("nvme")
            with pytest.raises(BlockNotFoundError):
                await kv.load([b"nope"], [0])


BAD_KEYS: list[Any] = [
    b"abc",
    "abc",
    {b"a"},
    7,
    None,
    (k for k in [b"a"]),
    [],
    [b"a", b"a"],
    [True],
    [1.5],
    [b"a", "b"],
    [[1]],
    [bytearray(b"a")],
    [memoryview(b"a")],
    [torch.tensor(3)],
]


@pytest.mark.anyio
@pytest.mark.parametrize("keys", BAD_KEYS, ids=repr)
async def test_bad_keys_raise_invalid_key_error_before_anything_changes(keys: Any) -> None:
    with anyio.fail_after(30):
        async with kvactors.open(small()) as kv:
            before = await kv.stats()
            with pytest.raises(InvalidKeyError):
                await kv.lookup(keys)
            with pytest.raises(InvalidKeyError):
                await kv.store(keys, [0])
            with pytest.raises(InvalidKeyError):
                await kv.load(keys, [0], partial=True)
            with pytest.raises(InvalidKeyError):
                kv.submit_store(keys, [0])
            with pytest.raises(InvalidKeyError):
                kv.prefetch(keys)
            after = await kv.stats()
            assert after.policy.tiers == before.policy.tiers


BAD_SLOTS: list[Any] = [
    [0.0, 1.0],
    ["0", "1"],
    {0, 1},
    [True, False],
    [torch.tensor(True), torch.tensor(False)],  # torch bools
    [torch.tensor([0]), torch.tensor([1])],  # one-element vectors, not integers
    [0, 0],
    [0],
    [0, 1, 2],
    [0, 8],
    [-1, 0],
    None,
    "01",
    torch.zeros((2, BB), dtype=torch.uint8, device="meta"),
    torch.zeros((2, BB + 1), dtype=torch.uint8),
    torch.zeros((3, BB), dtype=torch.uint8),
    torch.zeros((BB, 2), dtype=torch.uint8).t(),
    # Lazy views whose memory does not hold the values they show (a bare
    # RuntimeError from the byte view before): TensorSpecError too.
    torch.ones((2, BB // 8), dtype=torch.complex64).conj(),
    torch.ones((2, BB // 4), dtype=torch.float32)._neg_view(),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "slots", BAD_SLOTS, ids=lambda s: type(s).__name__ + str(getattr(s, "shape", s))[:30]
)
async def test_bad_src_dst_raise_tensor_spec_error_before_anything_changes(slots: Any) -> None:
    with anyio.fail_after(30):
        async with kvactors.open(small()) as kv:
            await kv.store([b"x", b"y"], [0, 1])
            before = await kv.stats()
            with pytest.raises(TensorSpecError):
                await kv.store([b"a", b"b"], slots)
            with pytest.raises(TensorSpecError):
                await kv.load([b"x", b"y"], slots)
            with pytest.raises(TensorSpecError):
                kv.submit_load([b"x", b"y"], slots)
            after = await kv.stats()
            assert after.policy.tiers == before.policy.tiers
            assert (await kv.lookup([b"a", b"b"])).hits == 0
            assert (await kv.lookup([b"x", b"y"])).hits == 2


@pytest.mark.anyio
async def test_numpy_and_torch_integer_slots_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    with anyio.fail_after(30):
        async with kvactors.open(small()) as kv:
            res = await kv.store([b"a", b"b"], [np.int64(0), torch.tensor(1)])
            assert res is not None
            assert res.stored == 2


@pytest.mark.anyio
async def test_tensor_src_any_dtype_with_the_right_bytes() -> None:
    with anyio.fail_after(30):
        async with kvactors.open(small()) as kv:
            src = torch.arange(2 * BB // 4, dtype=torch.int32).reshape(2, BB // 4)
            res = await kv.store([b"a", b"b"], src)
            assert res is not None
            assert res.stored == 2
            dst = torch.zeros((2, BB // 2), dtype=torch.float16)
            await kv.load([b"a", b"b"], dst)
            assert torch.equal(dst.view(torch.int32).reshape(2, -1), src)


class Mine(Exception):
    pass


@pytest.mark.anyio
async def test_errors_leave_the_block_as_themselves() -> None:
    with anyio.fail_after(30):
        with pytest.raises(Mine):
            async with kvactors.open(small()):
                raise Mine
        with pytest.raises(InvalidKeyError):
            async with kvactors.open(small()) as kv:
                await kv.lookup("abc")


@pytest.mark.anyio
async def test_calls_after_the_block_raise_actor_closed() -> None:
    with anyio.fail_after(30):
        async with kvactors.open(small()) as kv:
            pass
        for call in (
            lambda: kv.lookup([b"a"]),
            lambda: kv.store([b"a"], [0]),
            lambda: kv.load([b"a"], [0]),
            lambda: kv.stats(),
            lambda: kv.events(),
        ):
            with pytest.raises(ActorClosed):
                await call()
        assert kv.prefetch([b"a"]) is False
        fut = kv.submit_store([b"a"], [0])
        with pytest.raises(ActorClosed):
            await fut
        assert isinstance(fut.exception(), ActorClosed)


@pytest.mark.anyio
async def test_leaving_the_block_waits_for_submitted_futures() -> None:
    with anyio.fail_after(30):
        async with kvactors.open(small()) as kv:
            fut = kv.submit_store([b"a", b"b"], [0, 1])
        assert fut.done()
        res = fut.result()
        assert res is not None
        assert res.stored == 2


# --- docs/manager.md --------------------------------------------------------------


@pytest.mark.parametrize("native", [False, None])
@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"num_blocks": 0}, ConfigError),
        ({"num_blocks": 2**31}, ConfigError),
        ({"num_blocks": "4"}, ConfigError),
        ({"num_blocks": 4.0}, ConfigError),
        ({"num_blocks": 4, "block_size": 0}, ConfigError),
        ({"num_blocks": 4, "block_size": "16"}, ConfigError),
        ({"num_blocks": 4, "block_size": -1}, ConfigError),
        ({"num_blocks": True}, ConfigError),
        ({"num_blocks": 4, "medium": b"CPU"}, ConfigError),
        ({"num_blocks": 4, "medium": None}, ConfigError),
        ({"num_blocks": 4, "policy": "mru"}, UnknownPolicyError),
        ({"num_blocks": 4, "policy": None}, UnknownPolicyError),
        ({"num_blocks": 4, "policy": 3}, UnknownPolicyError),
    ],
)
def test_manager_constructor_errors(
    kwargs: dict[str, Any], error: type[Exception], native: bool | None
) -> None:
    field = list(kwargs)[-1]  # each case's wrong argument is its last
    kwargs = {"block_size": 16, **kwargs}
    with pytest.raises(error) as info:
        OffloadingManager(**kwargs, native=native)
    if error is UnknownPolicyError:
        assert "lru" in str(info.value)
        assert "arc" in str(info.value)
    else:
        assert str(info.value).startswith(f"{field} must be ")


@pytest.mark.parametrize("native", ["yes", 1, 0, "False"])
def test_manager_native_other_than_true_false_none_is_a_config_error(native: Any) -> None:
    """docs/manager.md's Errors table: `native` is True, False or None."""
    with pytest.raises(ConfigError, match=r"^native must be True, False or None"):
        OffloadingManager(4, block_size=16, native=native)


@pytest.mark.parametrize("native", [False, None])
def test_manager_readme_example(native: bool | None) -> None:
    mgr = OffloadingManager(
        num_blocks=4, block_size=16, policy="arc", enable_events=True, native=native
    )
    out = mgr.prepare_store([1, 2, 3])
    assert out is not None
    assert list(out.block_hashes_to_store) == [1, 2, 3]
    assert list(out.store_spec.block_ids) == [0, 1, 2]
    mgr.complete_store(out.block_hashes_to_store)
    assert mgr.lookup([1, 2, 3, 4]) == 3
    spec = mgr.prepare_load([1, 2])
    assert list(spec.block_ids) == [0, 1]
    assert mgr.prepare_store([5, 6, 7]) is None  # 1 free, 1 idle (3): not enough
    mgr.complete_load([1, 2])
    events = mgr.take_events()
    assert [(list(e.block_hashes), e.removed) for e in events] == [([1, 2, 3], False)]
    assert mgr.take_events() == []


# --- README: the command table --------------------------------------------------

CLI = [
    ["demo", "--requests", "8", "--cpu-blocks", "64", "--nvme-blocks", "64", "--block-kib", "4"],
    ["bench", "transfer", "--sizes", "64K", "--mib", "1", "--repeat", "1", "--dir", "{tmp}"],
    [
        "bench",
        "nvme-index",
        "--blocks",
        "512",
        "--rounds",
        "1",
        "--durable-seconds",
        "0.1",
        "--dir",
        "{tmp}",
    ],
    [
        "bench",
        "paged",
        "--requests",
        "20",
        "--prompt",
        "32",
        "--decode",
        "2",
        "--swap-blocks",
        "2",
        "--repeat",
        "1",
        "--layers",
        "1",
        "--kv-heads",
        "1",
        "--head-dim",
        "16",
        "--device",
        "cpu",
    ],
    ["bench", "soak", "--seconds", "1", "--clients", "2", "--keys", "32"],
    ["bench", "actors", "--block-kib", "16", "--batches", "4", "--mib", "1", "--repeat", "1"],
]


@pytest.mark.parametrize("argv", CLI, ids=lambda a: " ".join(a[:2]))
def test_every_command_prints_a_table_and_one_json_object_last(
    argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*argv, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    value = json.loads(lines[-1])
    assert isinstance(value, dict)
    assert value
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert len(table.strip().splitlines()) >= 2
    with pytest.raises(json.JSONDecodeError):
        json.loads(table.strip().splitlines()[-1])


# --- docs/api.md: events, stats, a store the cache cannot take ----------------------


def tiered() -> kvactors.Config:
    return small(cpu=kvactors.TierConfig(num_blocks=4), nvme=kvactors.NVMeConfig(num_blocks=16))


@pytest.mark.anyio
async def test_events_per_tier_and_the_stream_ends_at_close() -> None:
    got: list[tuple[str, str, list[Any]]] = []
    with anyio.fail_after(60):
        async with kvactors.open(tiered()) as kv:
            stream = await kv.events()
            await kv.store([0, 1, 2, 3], [0, 1, 2, 3])
            await kv.store([10, 11, 12, 13], [0, 1, 2, 3])  # demotes 0..3 to NVMe
            assert (await kv.load([0, 1], [4, 5])).tiers == ["nvme", "nvme"]  # promotes
        async with stream:  # an anyio receive stream: closed by its owner
            async for event in stream:  # ends: the cache is closed
                got.append((event.kind, event.tier, list(event.keys)))
    assert ("stored", "cpu", [0, 1, 2, 3]) in got
    assert ("removed", "cpu", [0, 1, 2, 3]) in got
    assert ("demoted", "nvme", [0, 1, 2, 3]) in got
    assert ("stored", "nvme", [0, 1, 2, 3]) in got
    assert ("promoted", "cpu", [0, 1]) in got
    assert {kind for kind, _, _ in got} <= {
        "stored",
        "removed",
        "promoted",
        "demoted",
        "corrupted",
        "missing",
    }


@pytest.mark.anyio
async def test_stats_has_managers_transfers_mailboxes_and_latencies() -> None:
    with anyio.fail_after(60):
        async with kvactors.open(tiered()) as kv:
            await kv.store([0, 1, 2, 3], range(4))
            await kv.load([0], [4])
            stats = await kv.stats()
    assert stats.policy.tiers["cpu"].capacity == 4
    assert stats.policy.tiers["nvme"].capacity == 16
    assert stats.tiers["cpu"].transfers["gpu->cpu"].bytes == 4 * BB
    assert stats.tiers["cpu"].transfers["cpu->gpu"].bytes == BB
    assert {a.name for a in stats.actors} >= {"coordinator", "policy", "cpu", "nvme"}
    assert all(a.mailbox_size == 256 for a in stats.actors)
    assert stats.latency["store"].count == 1
    assert stats.latency["load"].count == 1
    assert stats.latency["load"].p99_us >= stats.latency["load"].p50_us > 0


@pytest.mark.anyio
async def test_a_store_of_more_new_blocks_than_the_cpu_tier_holds_is_none() -> None:
    with anyio.fail_after(60):
        async with kvactors.open(tiered()) as kv:
            await kv.store([b"a"], [0])
            assert await kv.store([1, 2, 3, 4, 5], range(5)) is None
            assert (await kv.lookup([b"a"])).hits == 1
            assert (await kv.lookup([1])).hits == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--requests", "-1"],
        ["demo", "--cpu-blocks", "0"],
        ["demo", "--block-kib", "-4"],
        ["demo", "--concurrency", "0"],
        ["bench", "soak", "--seconds", "-1"],
        ["bench", "soak", "--clients", "0"],
        ["bench", "soak", "--read-faults", "2"],
        ["bench", "actors", "--repeat", "0"],
        ["bench", "actors", "--batches", "0"],
        ["bench", "transfer", "--sizes", "0"],
        ["bench", "transfer", "--sizes", "64Q"],
        ["bench", "transfer", "--sizes", "3K"],
        ["bench", "transfer", "--sizes", "64K,1"],
        ["bench", "soak", "--keys", "7"],
        ["bench", "transfer", "--mib", "0"],
        ["bench", "nvme-index", "--blocks", "0"],
        ["bench", "nvme-index", "--rounds", "nan"],
        ["bench", "paged", "--requests", "0"],
        ["bench", "remote", "--sizes", "0"],
        ["bench", "remote", "--mib", "0"],
        ["bench", "remote", "--repeat", "0"],
        ["bench", "remote", "--requests", "0"],
        ["bench", "remote", "--cpu-blocks", "0"],
    ],
)
def test_bad_numbers_on_the_command_line_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong argument exits 2 with a usage line, before any work (no traceback)."""
    assert main([*argv, "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: kvactors" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["bench", "transfer", "--dir", "{file}"], "--dir"),
        (["bench", "nvme-index", "--dir", "{file}"], "--dir"),
        (["bench", "remote", "--trace", "{missing}"], "cannot read trace"),
        (["bench", "vllm", "--vllm-python", "{missing}"], "--vllm-python"),
        (["demo", "--nvme-dir", "{file}"], "nvme.directory"),
        (["demo", "--nvme-dir", ""], "directory: empty"),
        (["demo", "--trace", "{missing}"], "cannot read trace"),
        (["demo", "--policy", "bogus"], "cpu.policy"),
        (["demo", "--device", "bogus"], "gpu.device"),
        (["demo", "--remote", "nonsense://x"], "url"),
        (["replay", "{missing}"], "cannot read trace"),
        (["bench", "policy", "--trace", "{missing}"], "cannot read trace"),
        (["bench", "paged", "--device", "bogus"], "device"),
        (["bench", "nvme-index", "--policy", "bogus"], "unknown policy"),
    ],
)
def test_bad_paths_and_names_on_the_command_line_exit_2_with_one_line(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A KVActorsError from a command "prints one line on stderr and exits with
    status 2, like a usage error": a --dir that is a file, a missing trace or
    interpreter, an unknown policy or device, a URL that is not Redis."""
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    names = {"file": str(file), "missing": str(tmp_path / "missing.jsonl")}
    assert main([a.format(**names) for a in argv] + ["--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("kvactors: error: ")
    assert len(err.strip().splitlines()) == 1
    assert says in err
    assert "Traceback" not in err
    assert file.read_text() == "not a directory"


@pytest.mark.anyio
async def test_move_bytes_false_takes_none_for_src_and_dst() -> None:
    """docs/api.md: `move_bytes = false` makes a metadata-only cache; src/dst are None."""
    with anyio.fail_after(30):
        async with kvactors.open(small(move_bytes=False)) as kv:
            res = await kv.store([1, 2], None)
            assert res is not None
            assert res.stored == 2
            assert (await kv.load([1, 2], None)).tiers == ["cpu", "cpu"]
            with pytest.raises(TensorSpecError):
                await kv.store([3, 4], [0, 1])
            assert (await kv.lookup([3])).hits == 0


def test_manager_md_which_core_and_policy() -> None:
    """docs/manager.md: mgr.native / policy / policy_name, NATIVE_POLICIES."""
    from kvactors.manager import NATIVE_POLICIES
    from kvactors.policy import POLICIES, LRUPolicy

    if not OffloadingManager(4, block_size=16).native:
        pytest.skip("the compiled core is not built here")
    assert set(NATIVE_POLICIES) == set(POLICIES)
    for name in POLICIES:
        fast = OffloadingManager(4, block_size=16, policy=name)
        assert (fast.native, fast.policy, fast.policy_name) == (True, None, name)
        slow = OffloadingManager(4, block_size=16, policy=name, native=False)
        assert slow.native is False
        assert isinstance(slow.policy, POLICIES[name])
        assert slow.policy_name == name
    own = LRUPolicy()
    mgr = OffloadingManager(4, block_size=16, policy=own)
    assert mgr.native
    assert mgr.policy is own
    mgr.prepare_store([1])
    status = mgr.get(1)
    assert status is not None
    assert (status.block_id, status.ref_cnt) == (0, -1)
    assert mgr.get(2) is None


@pytest.mark.anyio
async def test_any_bytes_or_int_is_a_key() -> None:
    """keys are bytes / int: big, negative and empty ones included."""
    keys: list[Any] = [2**100, -1, b"", 2**64]
    with anyio.fail_after(30):
        async with kvactors.open(small()) as kv:
            res = await kv.store(keys, range(4))
            assert res is not None
            assert res.stored == 4
            assert (await kv.lookup(keys)).hits == 4


def test_readme_remote_toml_and_api_md_example_load_from_files(tmp_path: Path) -> None:
    """README's [remote] snippet and docs/api.md's example are valid kv.toml files."""
    remote = doc_block(ROOT / "README.md", "toml", "[remote]")
    path = tmp_path / "kv.toml"
    path.write_text(remote)
    config = kvactors.Config.from_toml(path)
    assert config.remote is not None
    assert config.remote.url == "redis://127.0.0.1:6379/0"
    assert config.remote.model == "my-model/bf16"
    path.write_text(doc_block(ROOT / "docs" / "api.md", "toml", "block_bytes"))
    example = kvactors.Config.from_toml(path)
    assert example.nvme is not None
    assert example.nvme.directory == "/mnt/nvme/kv"
    assert example.replace(nvme={**msgspec.to_builtins(example.nvme), "directory": None}) == (
        kvactors.Config()
    )


def test_replay_md_output_is_what_replay_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/replay.md's "Output" block is what `kvactors replay --capacity 0.1` prints
    today, its --json has the keys shown, and "From Python" gives the figures shown."""
    text = (ROOT / "docs" / "replay.md").read_text()
    section = text.split("## Output", 1)[1]
    doc = re.search(r"```\n(.*?)```", section, flags=re.S)
    assert doc is not None
    want = doc.group(1).strip().splitlines()
    assert main(["replay", "--capacity", "0.1"]) == 0
    got = capsys.readouterr().out.strip().splitlines()
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w.startswith("trace: .../"):
            assert g.startswith("trace: ")
            assert g.endswith(w.removeprefix("trace: ..."))
        else:
            assert g == w
    assert main(["replay", "--capacity", "0.1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report) == {"title", "columns", "rows", "notes", "summary"}
    summary = report["summary"]
    assert list(summary) == [
        "command", "trace", "requests", "block_accesses", "unique_blocks", "capacity_blocks",
        "capacity_fraction", "mode", "lru_hits", "belady", "policies",
    ]  # fmt: skip
    assert set(summary["belady"]) == {
        "hits", "resident_hits", "hit_ratio", "stores_refused", "evictions",
    }  # fmt: skip
    assert set(summary["policies"]["lru"]) == {
        "hits", "hit_ratio", "of_belady", "of_gap", "stores_refused", "evictions", "seconds",
    }  # fmt: skip
    assert (summary["requests"], summary["block_accesses"]) == (12031, 288500)
    assert (summary["lru_hits"], summary["belady"]["hits"]) == (80419, 105710)
    assert summary["mode"] == "manager"

    from kvactors.cli.replay import belady, replay
    from kvactors.traces import bundled_trace, load_trace

    requests = [r.hash_ids for r in load_trace(bundled_trace("conversation"))]
    lru = replay(requests, "lru", 18_279)
    assert (lru.hits, lru.accesses) == (80419, 288500)
    assert belady(requests, 18_279).hits == 105710


# --- docs/architecture.md: the chain of tiers -------------------------------------


def test_architecture_md_names_the_tiers_and_the_chain_as_they_are() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    found = re.search(r"`kvactors\.config\.TIERS` names .*?\(`(\(.*?\))`\)", text, flags=re.S)
    assert found is not None
    from kvactors.config import TIERS, RemoteConfig

    assert ast.literal_eval(found.group(1)) == TIERS
    remote = RemoteConfig(url="redis://127.0.0.1:1/0")
    config = kvactors.Config(remote=remote)
    assert [name for name, _ in config.chain()] == ["cpu", "nvme", "remote"]
    assert [name for name, _ in kvactors.Config(nvme=None).chain()] == ["cpu"]


@pytest.mark.anyio
@pytest.mark.parametrize("buffer", [0, 2])
async def test_a_stream_that_falls_behind_loses_the_newest_events_counted(buffer: int) -> None:
    """docs/api.md: publishing never waits for a reader; a stream more than
    event_buffer events behind loses the newest ones, counted in events_dropped."""
    with anyio.fail_after(30):
        config = small().replace(event_buffer=buffer)
        async with kvactors.open(config) as kv, await kv.events() as stream:
            for k in range(5):
                await kv.store([k], [k])  # nobody reads: no store waits
            got = []
            with anyio.move_on_after(0.2):
                async for event in stream:
                    got.append(event.keys)
            stats = await kv.stats()
    assert got == [[k] for k in range(buffer)]
    assert stats.policy.events_dropped == 5 - buffer


@pytest.mark.anyio
async def test_gpu_pool_rows_and_write_rows_check_their_arguments() -> None:
    """docs/api.md: kv.gpu_pool's rows(ids) / write_rows(ids, rows) take slot ids in
    0..gpu.num_blocks-1 and (len(ids), block_bytes) uint8 rows; TensorSpecError otherwise."""
    with anyio.fail_after(30):
        async with kvactors.open(small()) as kv:
            pool = kv.gpu_pool
            before = pool.rows(range(8)).clone()
            row = torch.ones((1, BB), dtype=torch.uint8)
            bad_writes = [
                ([8], row),
                ([-1], row),
                ([0.5], row),
                ([0, 1], row),  # one row for two slots
                ([2, 2], torch.ones((2, BB), dtype=torch.uint8)),  # a slot named twice
                ([0], torch.ones((1, BB - 1), dtype=torch.uint8)),
                ([0], torch.ones((1, BB // 4), dtype=torch.int32)),
                ([0], None),
            ]
            for ids, rows in bad_writes:
                with pytest.raises(TensorSpecError, match=r"^write_rows: "):
                    pool.write_rows(ids, rows)  # type: ignore[arg-type]
            torch_bad = [torch.tensor(True), torch.tensor([1]), torch.tensor(1.0)]
            for ids in ([8], [-1], [True], None, {0}, *([t] for t in torch_bad)):
                with pytest.raises(TensorSpecError, match=r"^rows: "):
                    pool.rows(ids)  # type: ignore[arg-type]
            assert torch.equal(pool.rows(range(8)), before)  # nothing written
            pool.write_rows((3,), row)
            assert torch.equal(pool.rows([3]), row)


def _write_through(tmp_path: Path, cpu_blocks: int) -> kvactors.Config:
    """4 KiB blocks, a 4-slot GPU pool, ``cpu_blocks`` CPU slots, 16 NVMe slots in
    ``tmp_path / "kv"``, every store written through to NVMe."""
    return kvactors.Config(
        block_bytes=4096,
        write_mode="write_through",
        gpu=kvactors.GPUConfig(num_blocks=4, device="cpu"),
        cpu=kvactors.TierConfig(num_blocks=cpu_blocks),
        nvme=kvactors.NVMeConfig(num_blocks=16, directory=str(tmp_path / "kv")),
    )


@pytest.mark.anyio
async def test_a_key_too_long_for_the_nvme_index_stays_in_cpu_and_is_dropped_on_eviction(
    tmp_path: Path,
) -> None:
    # docs/api.md: keys over the NVMe index's 65,535 bytes are CPU-only, never durable.
    cfg = _write_through(tmp_path, cpu_blocks=2)
    long_key, short_key = b"k" * 65_536, b"s" * 65_535
    with anyio.fail_after(30):
        async with kvactors.open(cfg) as kv:
            first = await kv.store([long_key], [0])
            second = await kv.store([short_key], [0])
            assert first is not None
            assert first.stored == 1
            assert first.durable == []
            assert second is not None
            assert second.durable == [short_key]
            assert (await kv.lookup([long_key])).tiers == ["cpu"]
            for i in range(4):  # evict both from the two CPU slots
                await kv.store([i], [1])
            stats = await kv.stats()
            assert stats.policy.demotions_lost >= 1
            assert (await kv.lookup([long_key])).hits == 0
            assert (await kv.lookup([short_key])).tiers == ["nvme"]


@pytest.mark.anyio
async def test_open_without_a_config_uses_the_defaults() -> None:
    # docs/api.md: open() or open(None) runs the defaults of the configuration.
    defaults = kvactors.Config()
    assert defaults.nvme is not None
    with anyio.fail_after(60):
        for kv_open in (kvactors.open, lambda: kvactors.open(None)):
            async with kv_open() as kv:
                stats = await kv.stats()
                assert {name: t.capacity for name, t in stats.policy.tiers.items()} == {
                    "cpu": defaults.cpu.num_blocks,
                    "nvme": defaults.nvme.num_blocks,
                }
                assert {name: t.policy for name, t in stats.policy.tiers.items()} == {
                    "cpu": "lru",
                    "nvme": "lru",
                }
                last = defaults.gpu.num_blocks - 1
                assert kv.gpu_pool.rows([last]).shape == (1, defaults.block_bytes)
                with pytest.raises(TensorSpecError):
                    kv.gpu_pool.rows([last + 1])
                assert kv.medium("nvme").io == "buffered"  # a temporary directory


@pytest.mark.anyio
async def test_prefetch_returns_false_when_dropped_and_counts_it() -> None:
    # docs/api.md: prefetch is a lossy hint, NVMe blocks are promoted to CPU;
    # False when dropped (counted: stats().prefetch_dropped).
    config = small(
        mailbox_size=1,
        cpu=kvactors.TierConfig(num_blocks=1),
        nvme=kvactors.NVMeConfig(num_blocks=8),
    )
    with anyio.fail_after(30):
        async with kvactors.open(config) as kv:
            await kv.store([b"a"], [0])
            await kv.store([b"b"], [1])  # demotes a to NVMe
            assert (await kv.lookup([b"a"])).tiers == ["nvme"]
            assert (await kv.stats()).prefetch_dropped == 0
            sent = [kv.prefetch([b"a"]) for _ in range(6)]  # no await: the mailbox fills
            assert sent[0] is True
            assert False in sent
            assert (await kv.stats()).prefetch_dropped == sent.count(False)
            while (await kv.lookup([b"a"])).tiers != ["cpu"]:
                await anyio.sleep(0.01)  # the hint that got through promotes it


@pytest.mark.anyio
async def test_an_events_stream_dropped_unclosed_warns_resource_warning() -> None:
    # docs/api.md: the events stream is an anyio receive stream; close it when
    # done, else it warns ResourceWarning when dropped.
    import gc

    with anyio.fail_after(30):
        async with kvactors.open(small()) as kv:
            async with await kv.events() as closed:
                await kv.store([b"a"], [0])
                assert (await closed.receive()).keys == [b"a"]
            del closed
            gc.collect()  # a closed stream does not warn (warnings are errors here)
            streams = [await kv.events()]
            with pytest.warns(ResourceWarning, match="Unclosed"):
                streams.clear()  # the last reference: dropped at once


@pytest.mark.anyio
async def test_submit_futures_poll_and_await_as_documented() -> None:
    # docs/api.md: a submit_* future has done(), result(), exception() or is
    # awaited; result()/exception() before done() raise RuntimeError, and
    # cancelling a waiter does not cancel the call.
    with anyio.fail_after(30):
        async with kvactors.open(small()) as kv:
            fut = kv.submit_store([b"a"], [0])
            assert not fut.done()
            with pytest.raises(RuntimeError, match="not done"):
                fut.result()
            with pytest.raises(RuntimeError, match="not done"):
                fut.exception()
            with anyio.CancelScope() as scope:
                scope.cancel()
                await fut  # cancelled at once: the store goes on
            assert scope.cancelled_caught
            stored = await fut
            assert fut.done()
            assert fut.exception() is None
            assert fut.result() is stored
            assert stored is not None
            assert stored.stored == 1
            assert (await kv.lookup([b"a"])).tiers == ["cpu"]
            missing = kv.submit_load([b"zz"], [1])
            with pytest.raises(BlockNotFoundError):
                await missing
            assert isinstance(missing.exception(), BlockNotFoundError)
            with pytest.raises(BlockNotFoundError):
                missing.result()


@pytest.mark.anyio
async def test_load_partial_must_be_a_bool() -> None:
    # docs/api.md: partial is True or False; anything else raises TensorSpecError
    # before anything changes (submit_load included).
    with anyio.fail_after(30):
        async with kvactors.open(small()) as kv:
            await kv.store([b"a"], [0])
            before = await kv.stats()
            for bad in (1, 0, None, "yes"):
                with pytest.raises(TensorSpecError, match="partial"):
                    await kv.load([b"a"], [1], partial=bad)  # type: ignore[arg-type]
                with pytest.raises(TensorSpecError, match="partial"):
                    kv.submit_load([b"a"], [1], partial=bad)  # type: ignore[arg-type]
            after = await kv.stats()
            assert after.latency["load"].count == before.latency["load"].count == 0
            assert (await kv.load([b"a"], [1], partial=True)).tiers == ["cpu"]


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["demo", "--requests", "-1"], "kvactors demo"),
        (["replay", "--capacity", "0"], "kvactors replay"),
        (["bench", "nope"], "kvactors bench"),
        (["nope"], "kvactors"),
        (["bench", "policy", "--bogus"], "kvactors"),
    ],
)
def test_a_bad_argument_prints_usage_then_one_error_line_and_exits_2(
    argv: list[str], command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # README.md: a bad argument prints the command's usage, then one line naming
    # the command, and exits 2; no traceback.
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: kvactors")
    assert "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"{command}: error: ")
    assert sum("error:" in line for line in err.splitlines()) == 1


def test_a_kvactors_error_prints_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # README.md: a kvactors error prints one line (kvactors: error: ...) and exits 2.
    missing = tmp_path / "missing.jsonl"
    assert main(["replay", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n")
    assert err.count("\n") == 1
    assert err.startswith(f"kvactors: error: cannot read trace '{missing}'")


@pytest.mark.parametrize(
    "field", ["connect_timeout", "timeout", "retry_after", "flush_timeout", "ttl"]
)
def test_remote_seconds_past_a_floats_range_are_a_config_error(field: str) -> None:
    # docs/api.md: the remote tier's seconds are finite numbers > 0; every wrong
    # value raises ConfigError naming the field (an int too large for a float too).
    huge = 2**1100
    with pytest.raises(ConfigError, match=field):
        RemoteConfig(url="redis://127.0.0.1:6379/0", model="m", **{field: huge})
    with pytest.raises(ConfigError, match=field):
        kvactors.Config.from_dict(
            {"remote": {"url": "redis://127.0.0.1:6379/0", "model": "m", field: huge}}
        )
    assert getattr(RemoteConfig(url="redis://h:1/0", model="m", **{field: 2**20}), field) == 2**20


@pytest.mark.anyio
async def test_a_block_size_no_machine_holds_is_a_config_error_at_open() -> None:
    # docs/api.md: at open, pools too large for this machine raise ConfigError
    # naming the field, also for a block_bytes past a float's range.
    with anyio.fail_after(30):
        for block_bytes in (2**1100, 2**60):
            with pytest.raises(ConfigError, match=r"^gpu\.num_blocks: the pools up to this one"):
                async with kvactors.open(small(block_bytes=block_bytes)):
                    pass


def test_pools_only_an_idle_machine_holds_are_a_config_error() -> None:
    # docs/api.md: the pools are checked against the host memory available, not
    # the machine's total; pools between the two would pass a check against the
    # total and be killed by the kernel while they are zero-filled (so this test
    # only checks, it allocates nothing).
    from kvactors.media import check_sizes

    with open("/proc/meminfo", encoding="ascii") as meminfo:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo}
    available = info["MemAvailable"]
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert total - available > 64 << 20  # room between the two for the check below
    blocks = (available + total) // 2 // BB
    with pytest.raises(ConfigError, match=r"^gpu\.num_blocks: .* GiB available$"):
        check_sizes(
            small(gpu=kvactors.GPUConfig(num_blocks=blocks, device="cpu")), torch.device("cpu")
        )
    check_sizes(small(gpu=kvactors.GPUConfig(num_blocks=8, device="cpu")), torch.device("cpu"))


def _takes_o_direct(directory: Path) -> bool:
    import errno

    probe = directory / "probe"
    probe.write_bytes(b"\0" * BB)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        probe.unlink()
    os.close(fd)
    return True


@pytest.mark.anyio
async def test_nvme_io_auto_is_direct_exactly_where_the_file_system_takes_o_direct(
    tmp_path: Path,
) -> None:
    # docs/api.md: "auto" is direct for a named directory whose file system
    # accepts O_DIRECT (a tmpfs does from Linux 6.6 on), buffered otherwise;
    # "direct" where the file system refuses it is a ConfigError naming nvme.io.
    from kvactors.media import file_store

    if file_store._io_vectored is None:
        pytest.skip("compiled I/O core not built")
    shm = Path("/dev/shm")
    places = [tmp_path]
    if shm.is_dir() and os.access(shm, os.W_OK):
        places.append(shm)
    with anyio.fail_after(60):
        for place in places:
            base = Path(tempfile.mkdtemp(dir=place))
            try:
                direct = _takes_o_direct(base)
                for io in ("auto", "direct"):
                    nvme = kvactors.NVMeConfig(num_blocks=8, directory=str(base / io), io=io)
                    if io == "direct" and not direct:
                        with pytest.raises(ConfigError, match=r"nvme\.io"):
                            async with kvactors.open(small(nvme=nvme)):
                                pass
                        continue
                    async with kvactors.open(small(nvme=nvme)) as kv:
                        want = "direct" if direct else "buffered"
                        assert kv.medium("nvme").io == want, (place, io)
            finally:
                shutil.rmtree(base, ignore_errors=True)


@pytest.mark.anyio
async def test_an_int_key_too_long_for_the_nvme_index_is_never_durable(tmp_path: Path) -> None:
    # docs/api.md: an int key whose signed little-endian bytes exceed 65,535 is
    # CPU-only, never durable; the keys stored after it stay durable across a
    # reopen (its record used to wrap its 16-bit length and cut the log there).
    cfg = _write_through(tmp_path, cpu_blocks=8)
    too_long = [2**524279, -(2**524279)]
    fits = [2**524279 - 1, -(2**524279) + 1, 2**800, b"after"]
    with anyio.fail_after(60):
        async with kvactors.open(cfg) as kv:
            for key in too_long:
                result = await kv.store([key], [0])
                assert result is not None
                assert (result.stored, result.durable) == (1, [])
                assert (await kv.lookup([key])).tiers == ["cpu"]
            for key in fits:
                result = await kv.store([key], [1])
                assert result is not None
                assert result.durable == [key]
        async with kvactors.open(cfg) as kv:
            assert (await kv.lookup(too_long)).hits == 0
            for key in fits:
                assert (await kv.lookup([key])).tiers == ["nvme"]


@pytest.mark.anyio
@pytest.mark.parametrize("long_key", [b"k" * 65_536, 2**524279], ids=["bytes", "int"])
async def test_a_write_through_call_naming_a_too_long_key_writes_its_other_keys_through(
    tmp_path: Path, long_key: bytes | int
) -> None:
    # docs/api.md: under write_through a key too long for the NVMe index is left
    # out of the call's NVMe write; the call's other new keys are written through
    # and durable, across a reopen too.
    cfg = _write_through(tmp_path, cpu_blocks=8)
    with anyio.fail_after(60):
        async with kvactors.open(cfg) as kv:
            mixed = await kv.store([1, long_key, 2], [0, 1, 2])
            assert mixed is not None
            assert (mixed.stored, mixed.durable) == (3, [1, 2])
            assert (await kv.lookup([1, long_key, 2])).tiers == ["cpu"] * 3
            assert (await kv.stats()).tiers["nvme"].failed_jobs == 0
        async with kvactors.open(cfg) as kv:
            assert (await kv.lookup([1, 2])).tiers == ["nvme", "nvme"]
            assert (await kv.lookup([long_key])).hits == 0


@pytest.mark.anyio
@pytest.mark.parametrize("long_key", [b"k" * 65_536, 2**524279], ids=["bytes", "int"])
async def test_a_too_long_key_evicted_with_others_is_dropped_and_they_are_demoted(
    tmp_path: Path, long_key: bytes | int
) -> None:
    # docs/api.md: evicted from CPU, a key too long for the NVMe index is dropped
    # (demotions_lost), not demoted; the victims evicted with it are demoted.
    cfg = _write_through(tmp_path, cpu_blocks=3).replace(write_mode="write_back")
    with anyio.fail_after(60):
        async with kvactors.open(cfg) as kv:
            first = await kv.store([1, long_key, 2], [0, 1, 2])
            assert first is not None
            assert first.durable == []
            evicting = await kv.store([3, 4, 5], [0, 1, 2])  # all three victims at once
            assert evicting is not None
            stats = await kv.stats()
            assert stats.policy.demotions_lost == 1
            assert stats.tiers["nvme"].failed_jobs == 0
            assert (await kv.lookup([1, 2])).tiers == ["nvme", "nvme"]
            assert (await kv.lookup([long_key])).hits == 0
