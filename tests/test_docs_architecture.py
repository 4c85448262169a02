"""docs/architecture.md's folder map against the package: every module it
names exists in the folder it is named under, every module is named there,
and the folders are in an order no import goes up (the map's claim); the
package docstring lists the folders in the same order."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import anyio
import pytest

import kvactors
from _docs import DOCS, ROOT
from kvactors import Config, GPUConfig, LoadResult, NVMeConfig, TierConfig
from kvactors.cache.results import CacheStats
from kvactors.cli import BENCHES

PACKAGE = ROOT / "src" / "kvactors"
ARCHITECTURE = DOCS / "architecture.md"
BASE = ("errors", "keys", "traces")  # under every layer, importing none


def folder_map() -> dict[str, str]:
    """The map's text of each top folder (its lines up to the next folder)."""
    block = re.search(r"```\nsrc/kvactors/\n(.*?)```", ARCHITECTURE.read_text(), flags=re.S)
    assert block, "no folder map in docs/architecture.md"
    sections: dict[str, str] = {}
    name = ""
    for line in block.group(1).splitlines():
        m = re.match(r"  (\w+)/ ", line)
        if m:
            name = m.group(1)
            sections[name] = ""
        elif not line.startswith("   "):
            name = "."  # the top-level modules' line
            sections.setdefault(name, "")
        sections[name] += line + "\n"
    return sections


MAP = folder_map()
FOLDERS = [name for name in MAP if name != "."]


def modules(folder: str) -> list[Path]:
    return sorted(p for p in (PACKAGE / folder).rglob("*.py") if p.name != "__init__.py")


def test_the_map_names_every_folder_of_the_package() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert set(FOLDERS) == folders


def test_every_module_is_named_under_its_folder() -> None:
    benches = {module.rsplit(".", 1)[1] for _, module in BENCHES}  # "one module a benchmark"
    for folder in FOLDERS:
        for path in modules(folder):
            if path.parent == PACKAGE / "cli" / "bench" and path.stem in benches:
                continue
            assert re.search(rf"\b{path.stem}\b", MAP[folder]), f"{folder}/{path.name}"
    for path in PACKAGE.glob("*.py"):
        if path.name != "__init__.py":
            assert path.name in MAP["."], path.name


def test_every_module_the_map_names_exists_there() -> None:
    for folder in FOLDERS:
        for name in re.findall(r"\b(\w+\.py)\b", MAP[folder]):
            assert list((PACKAGE / folder).rglob(name)), f"{folder}/ has no {name}"


def imported(path: Path) -> set[str]:
    """The kvactors folders and top-level modules ``path`` imports, anywhere in it."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + (path.name == "__init__.py")]
                names = [".".join([*base, *([node.module] if node.module else [])])]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "kvactors" and len(parts) > 1 and not parts[1].startswith("_"):
                found.add(parts[1])
    return found


def test_no_import_goes_up_the_map() -> None:
    for i, folder in enumerate(FOLDERS):
        above = set(FOLDERS[:i])
        for path in modules(folder):
            up = imported(path) & above
            assert not up, f"{path.relative_to(PACKAGE)} imports {sorted(up)}, above it"
    for name in BASE:
        assert not imported(PACKAGE / f"{name}.py") - set(BASE), name


def test_the_package_docstring_lists_the_folders_in_the_map_order() -> None:
    doc = kvactors.__doc__ or ""
    listed = re.findall(r"^    (\w+)/ ", doc, flags=re.M)
    assert listed == FOLDERS


def tiers(cpu_blocks: int) -> Config:
    return Config(
        block_bytes=4096,
        gpu=GPUConfig(num_blocks=8, device="cpu"),
        cpu=TierConfig(num_blocks=cpu_blocks),
        nvme=NVMeConfig(num_blocks=16),
    )


def jobs(stats: CacheStats) -> dict[str, dict[str, int]]:
    return {name: {pair: op.jobs for pair, op in tier.transfers.items()}
            for name, tier in stats.tiers.items()}  # fmt: skip


@pytest.mark.anyio
async def test_a_promotion_and_the_load_out_of_it_run_as_one_job_of_the_nvme_tier() -> None:
    with anyio.fail_after(60):
        async with kvactors.open(tiers(cpu_blocks=2)) as kv:
            await kv.store([0, 1], [0, 1])
            await kv.store([2, 3], [2, 3])  # demotes 0 and 1 to NVMe
            before = jobs(await kv.stats())
            assert await kv.load([0], [4]) == LoadResult(tiers=["nvme"])
            after = jobs(await kv.stats())
    assert before["nvme"] == {"cpu->nvme": 1}
    assert after["cpu"] == before["cpu"] == {"gpu->cpu": 2}  # nothing read out of CPU here
    # The promotion (which demoted a block to make room) and the copy out of it:
    assert after["nvme"] == {"cpu->nvme": 2, "nvme->cpu": 1, "cpu->gpu": 1}


@pytest.mark.anyio
async def test_a_read_with_no_top_tier_slot_runs_nvme_to_gpu_on_the_nvme_tier() -> None:
    with anyio.fail_after(60):
        async with kvactors.open(tiers(cpu_blocks=2)) as kv:
            for first in (0, 2, 4):
                await kv.store([first, first + 1], [first, first + 1])
            # 0-3 are in NVMe only, and the CPU tier holds two blocks: no promotion.
            assert await kv.load([0, 1, 2, 3], [4, 5, 6, 7]) == LoadResult(tiers=["nvme"] * 4)
            after = jobs(await kv.stats())
    assert after["cpu"] == {"gpu->cpu": 3}
    assert after["nvme"] == {"cpu->nvme": 2, "nvme->gpu": 1}
