"""The example scripts run end to end (small sizes) and check every reused block."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """Import an example as ``python examples/NAME.py`` runs it: with its folder
    first on the import path (the examples share ``examples/_serving.py``)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def import_example(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        return module

    return import_example


def test_async_serving_example(
    load: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    assert load("async_serving").main(["--requests", "80", "--concurrency", "3"]) == 0
    out = capsys.readouterr().out
    assert "requests 80" in out
    fields = dict(zip(out.split()[0::2], out.split()[1::2]))
    assert int(fields["reused"]) + int(fields["computed"]) == int(fields["blocks"])
    assert int(fields["reused"]) > 0


def test_sync_scheduler_example(
    load: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
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
    name: str,
    argv: list[str],
    load: Callable[[str], ModuleType],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        load(name).main(argv)
    assert exc.value.code == 2
    assert "must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["async_serving", "sync_scheduler"])
def test_an_example_runs_as_the_readme_says(name: str) -> None:
    """``python examples/NAME.py`` from the checkout's root, in a process of its own
    (so nothing the test process imported helps it find ``_serving``)."""
    done = subprocess.run(
        [sys.executable, f"examples/{name}.py", "--requests", "12"],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    fields = dict(zip(done.stdout.split()[0::2], done.stdout.split()[1::2]))
    assert fields["requests"] == "12"
