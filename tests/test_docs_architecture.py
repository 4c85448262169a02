"""docs/architecture.md's folder map against the package: every module it
names exists in the folder it is named under, every module is named there,
and the folders are in an order no import goes up (the map's claim); the
package docstring lists the folders in the same order."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import kvactors
from _docs import DOCS, ROOT
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
