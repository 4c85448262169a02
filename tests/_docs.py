"""Reading the promises out of README.md and docs/*.md: code blocks and tables."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def doc_block(path: Path, lang: str, contains: str) -> str:
    """The first ```lang block of ``path`` that contains ``contains``."""
    for block in re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S):
        if contains in block:
            return str(block)
    raise AssertionError(f"no {lang} block with {contains!r} in {path.name}")


def doc_table(path: Path, after: str) -> list[list[str]]:
    """The body cells of the first markdown table from the line containing
    ``after`` on (that line may be the table's header; header and separator
    rows are left out)."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if after in line), None)
    assert start is not None, f"{after!r} not in {path.name}"
    rows: list[list[str]] = []
    for line in lines[start:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(rows) > 2, f"no table after {after!r} in {path.name}"
    return rows[2:]


def code(cell: str) -> str:
    """The first `code` span of a table cell."""
    found = re.search(r"`([^`]*)`", cell)
    assert found is not None, cell
    return found.group(1)


def toml_value(cell: str) -> Any:
    """A default as the docs write it: a TOML literal in backticks, or ``none``."""
    text = cell.strip()
    if text == "none":
        return None
    return tomllib.loads(f"v = {code(text)}")["v"]
