"""The example scripts run end to end (small sizes) and check every reused block."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_async_serving_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert load("async_serving").main(["--requests", "80", "--concurrency", "3"]) == 0
    out = capsys.readouterr().out
    assert "requests 80" in out
    fields = dict(zip(out.split()[0::2], out.split()[1::2]))
    assert int(fields["reused"]) + int(fields["computed"]) == int(fields["blocks"])
    assert int(fields["reused"]) > 0


def test_sync_scheduler_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert load("sync_scheduler").main(["--requests", "80", "--batch", "3"]) == 0
    out = capsys.readouterr().out
    fields = dict(zip(out.split()[0::2], out.split()[1::2]))
    assert fields["requests"] == "80"
    assert int(fields["reused"]) > 0


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("async_serving", ["--requests", "0"]),
        ("async_serving", ["--concurrency", "0"]),
        ("sync_scheduler", ["--requests", "-1"]),
        ("sync_scheduler", ["--batch", "0"]),
    ],
)
def test_an_example_given_a_count_below_one_is_a_usage_error(
    name: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        load(name).main(argv)
    assert exc.value.code == 2
    assert "must be positive" in capsys.readouterr().err
