"""The command synopses of docs/benchmarks.md (the ``kvactors bench NAME [...]``
blocks): one for every benchmark, naming every option it has, each with the
default (`[--mib 256]`) or the choices (`[--io auto|direct|buffered]`) the
parser has."""

from __future__ import annotations

import argparse
import re

import pytest

from _docs import DOCS
from kvactors.cli import BENCHES, build_parser

BENCHMARKS = DOCS / "benchmarks.md"


def synopses() -> dict[str, str]:
    """Each benchmark's synopsis, its lines joined, by name."""
    found: dict[str, str] = {}
    for block in re.findall(r"```\n(.*?)```", BENCHMARKS.read_text(), flags=re.S):
        m = re.match(r"kvactors bench ([a-z-]+) ", block)
        if m:
            assert m.group(1) not in found, f"two synopses of bench {m.group(1)}"
            found[m.group(1)] = " ".join(block.split())
    return found


SYNOPSES = synopses()


def options(name: str) -> dict[str, argparse.Action]:
    parser = build_parser(["bench", name])
    bench = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = bench.choices["bench"]
    benches = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
    return {
        flag: action
        for action in benches.choices[name]._actions
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)
        for flag in action.option_strings
    }


def test_every_benchmark_has_a_synopsis() -> None:
    assert sorted(SYNOPSES) == sorted(name for name, _ in BENCHES)


@pytest.mark.parametrize("name", [name for name, _ in BENCHES])
def test_a_synopsis_names_every_option_with_its_default(name: str) -> None:
    synopsis = SYNOPSES[name]
    known = options(name)
    named: set[str] = set()
    for group in re.findall(r"\[([^\]]+)\]", synopsis):
        for alternative in group.split(" | "):
            flag, *values = alternative.split()
            assert flag in known, f"bench {name}: {flag} is not an option"
            named.add(flag)
            action = known[flag]
            if not values:
                assert action.nargs == 0, f"bench {name}: {flag} takes a value"
            elif len(values) == 1 and "|" in values[0]:
                assert action.choices is not None, f"bench {name}: {flag} has no choices"
                assert set(values[0].split("|")) == set(action.choices), flag
            elif values[0].isupper():  # a placeholder: N, PATH, URL, FRACTION
                assert action.nargs != 0, f"bench {name}: {flag} takes no value"
            else:
                convert = action.type if callable(action.type) else str
                shown = [convert(value) for value in values]
                default = action.default
                if isinstance(default, str):
                    default = convert(default)
                documented = shown if action.nargs in ("+", "*") else shown[0]
                assert documented == default, f"bench {name}: {flag} defaults to {default!r}"
    missing = sorted(set(known) - named)
    assert not missing, f"bench {name}: not in the synopsis: {missing}"
