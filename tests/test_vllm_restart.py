"""A vLLM engine stopped and a new one started on the same NVMe directory, end to
end (docs/vllm.md, ``nvme_directory``): the files are scratch space, so the new
engine, even with another ``nvme_bytes`` and ``nvme_stripes``, starts the
directory empty (the earlier run's ``index.*`` and ``blocks*.bin`` deleted,
other files kept), neither refusing nor serving them, and its own CPU and NVMe
tiers give hits and the same greedy tokens.

Runs in the vLLM venv like tests/test_vllm_engine.py (same tiny model and
prompts), one in-process engine per run, each in a process of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _vllm_venv import vllm_python
from kvactors.vllm import extra_config
from test_vllm_engine import ROW, _base, _hits, _run, _tiny_model

pytestmark = pytest.mark.vllm


def test_an_engine_restarted_on_the_same_nvme_directory_starts_it_fresh(tmp_path: Path) -> None:
    python = vllm_python()
    base = {**_base(_tiny_model(tmp_path)), "executor": "uni"}
    nvme = tmp_path / "nvme"

    def engine(name: str, nvme_bytes: int, stripes: int) -> dict[str, object]:
        kv = extra_config(
            cpu_bytes=60 * ROW,
            nvme_bytes=nvme_bytes,
            nvme_stripes=stripes,
            nvme_directory=str(nvme),
        )
        result: dict[str, object] = _run(python, name, {**base, "extra_config": kv}, False)
        return result

    first = engine("first", 256 * ROW, 1)
    assert _hits(first, "disk") > 0  # it used its NVMe files
    left = {p.name for p in nvme.iterdir()}
    assert "blocks.bin" in left, left
    assert any(n.startswith("index.") for n in left), left
    (nvme / "notes.txt").write_text("not the cache's\n")

    # Another size and two stripes: the first run's geometry would be refused
    # if its files were taken for this run's.
    second = engine("second", 192 * ROW, 2)
    assert second["tokens"] == first["tokens"]
    assert _hits(second, "host") > 0
    assert _hits(second, "disk") > 0
    names = {p.name for p in nvme.iterdir()}
    assert "blocks.bin" not in names, names  # the first run's block file is gone
    assert {"blocks.0.bin", "blocks.1.bin", "notes.txt"} <= names, names
    assert (nvme / "notes.txt").read_text() == "not the cache's\n"
