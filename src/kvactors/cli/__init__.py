"""The ``kvactors`` command line.

Every command is a module exposing two functions::

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> kvactors.cli.report.Report

and is registered by one line below: top-level commands in :data:`COMMANDS`,
``kvactors bench <name>`` in :data:`BENCHES`. The CLI adds ``--json`` to every
command; ``run`` reads ``args.json`` only to silence its progress bars. A
command's module is imported only when that command runs (or for ``--help``),
so a command that needs torch does not slow the others down.

Output: the report as a table on stdout, or with ``--json`` exactly one line
of JSON. A :class:`~kvactors.errors.KVActorsError` or an :class:`OSError` (a
full disk, a permission denied) prints one line on stderr and exits with
status 2, like a usage error. Ctrl-C exits with status 130 and a SIGTERM with
143, each once the command's clean-up has run (see :mod:`kvactors.cli.stopping`;
a command runs its event loop with :func:`~kvactors.cli.stopping.run_async`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import cast

from kvactors.cli.report import Report
from kvactors.cli.stopping import sigterm_as_interrupt, terminating
from kvactors.errors import KVActorsError

__all__ = ["BENCHES", "COMMANDS", "build_parser", "main"]

COMMANDS: list[tuple[str, str]] = [
    ("demo", "kvactors.cli.demo"),
    ("replay", "kvactors.cli.replay"),
]
"""Top-level commands other than ``bench``: (name, module)."""

BENCHES: list[tuple[str, str]] = [
    ("policy", "kvactors.cli.bench.policy"),
    ("actors", "kvactors.cli.bench.actors"),
    ("paged", "kvactors.cli.bench.paged"),
    ("soak", "kvactors.cli.bench.soak"),
    ("transfer", "kvactors.cli.bench.transfer"),
    ("nvme-index", "kvactors.cli.bench.nvme_index"),
    ("remote", "kvactors.cli.bench.remote"),
    ("vllm", "kvactors.cli.bench.vllm"),
]
"""``kvactors bench`` subcommands: (name, module), modules under ``kvactors.cli.bench``."""

Runner = Callable[[argparse.Namespace], Report]

_OUT_OF_MEMORY = ("can't allocate memory", "out of memory")


def _is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of memory: a :class:`MemoryError`, or torch's
    allocation failure (``torch.OutOfMemoryError``, or the ``RuntimeError`` its CPU
    allocator raises), told apart without importing torch."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(
        words in str(exc).lower() for words in _OUT_OF_MEMORY
    )


def _first_words(argv: Sequence[str]) -> list[str]:
    # No option before a command takes a value, so the leading non-option
    # words are the command path (``bench policy``).
    return [arg for arg in argv if not arg.startswith("-")][:2]


_ROLE = re.compile(r":[a-z]+:`~?([^`]*)`")


def plain_text(doc: str) -> str:
    """A command module's docstring as ``--help`` prints it: reStructuredText's
    inline markup dropped (a cross-reference ``:class:`~a.B``` reads ``B``, a
    literal ````x```` reads ``x``)."""

    def name(match: re.Match[str]) -> str:
        target = match.group(1)
        return target.rsplit(".", 1)[-1] if match.group(0).count("~") else target

    return _ROLE.sub(name, doc).replace("``", "")


def _add_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    module_name: str,
    *,
    load: bool,
) -> None:
    if not load:
        # Never selected in this run: a bare entry keeps the choice valid.
        subparsers.add_parser(name)
        return
    module = importlib.import_module(module_name)
    doc = plain_text((module.__doc__ or "").strip())
    first = doc.splitlines()[0] if doc else ""
    parser = subparsers.add_parser(
        name,
        help=first.removeprefix(f"kvactors {name}: ").removeprefix(f"kvactors bench {name}: ")
        or None,
        description=doc or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cast(Callable[[argparse.ArgumentParser], None], module.add_arguments)(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (one line) instead of the table",
    )
    parser.set_defaults(run=cast(Runner, module.run))


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser, loading only the command modules that ``argv`` selects.

    With no command in ``argv`` (``kvactors --help``) every module is loaded.
    """
    from kvactors import __version__

    words = _first_words(argv)
    chosen = words[0] if words else None
    parser = argparse.ArgumentParser(
        prog="kvactors",
        description="Tiered KV-cache offloading: trace replay, benchmarks and a demo.",
    )
    parser.add_argument("--version", action="version", version=f"kvactors {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS:
        _add_command(commands, name, module, load=chosen in (None, name))

    bench = commands.add_parser(
        "bench",
        help="speed benchmarks, each against a baseline measured in the same run",
        description="Speed benchmarks; each prints its figures and a ratio against a "
        "baseline measured in the same run.",
    )
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    bench_chosen = words[1] if chosen == "bench" and len(words) > 1 else None
    for name, module in BENCHES:
        load = chosen == "bench" and bench_chosen in (None, name)
        _add_command(benches, name, module, load=load)
    return parser


INTERRUPTED = 130
"""Exit status after Ctrl-C (SIGINT): 128 + 2, as a shell reports a process it ended."""

TERMINATED = 143
"""Exit status after a SIGTERM: 128 + 15."""


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default ``sys.argv[1:]``); return the exit status.

    0 on success, 2 for a usage error, a :class:`~kvactors.errors.KVActorsError` or an
    :class:`OSError` such as a full disk (one line on stderr), 1 when memory runs out
    (one line; a :class:`MemoryError` or torch's allocation failure on the CPU or a
    GPU), 130 when interrupted (Ctrl-C) and 143 on a SIGTERM, with nothing on stdout,
    once the command's clean-up has run.
    """
    args_list = sys.argv[1:] if argv is None else argv
    with sigterm_as_interrupt() as terminated:
        try:
            status = _main(args_list)
        except KeyboardInterrupt:  # while the parser loads the command's modules
            status = INTERRUPTED
        return TERMINATED if terminated else status


def _main(args_list: list[str]) -> int:
    parser = build_parser(args_list)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        report = cast(Runner, args.run)(args)
    except KVActorsError as exc:
        message = " ".join(str(exc).split())
        print(f"kvactors: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return INTERRUPTED
    except OSError as exc:
        # Disk full, permission denied, a path that went away: the system's words.
        where = f": {exc.filename}" if exc.filename is not None else ""
        reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
        print(f"kvactors: error: {reason}{where}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        print("kvactors: error: out of memory (try smaller sizes)", file=sys.stderr)
        return 1
    if terminating():  # a SIGTERM the command's own clean-up absorbed: print nothing
        return TERMINATED
    try:
        if args.json:
            print(report.to_json())
        else:
            report.render(sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``kvactors replay | head``): stop quietly, and keep
        # the interpreter's final flush from raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return report.status
