"""Every `kvactors ...` command README.md and docs/*.md show (in code spans and
shell blocks) is one the CLI accepts: its command, flags and values parse, with
the placeholders (N, PATH, URL, TRACE, F) given sample values. Running them is
left to the tests of each command; this catches a doc that names a flag the
code does not have, or a value it refuses."""

from __future__ import annotations

import re

import pytest

from _docs import DOCS, ROOT
from kvactors.cli import build_parser

COMMAND = r"(?:\.venv/bin/)?kvactors (?:demo|replay|bench)\b"
SAMPLES = {
    "N": "1000",
    "F": "0.1",
    "R": "0.02",  # benchmarks.md: `--rounds R`, R given in the text after it
    "URL": "redis://127.0.0.1:6379/0",
    "TRACE": "synthetic",
    "TRACE.jsonl": "synthetic",
}


def documented_commands() -> list[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = path.read_text()
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose):
            span = " ".join(span.split())
            if re.match(COMMAND, span):
                found.add((path.name, span))
        for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
            if lang not in ("bash", "sh", "console", ""):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                m = re.search(
                    r"(?:^|&& )((?:\.venv/bin/)?kvactors (?:demo|replay|bench)\b.*)", line
                )
                if m:
                    found.add((path.name, m.group(1)))
    return sorted(found)


def argv_of(command: str) -> list[str] | None:
    """The argument list a command stands for; None for the generic form
    (`kvactors bench <name> [options]`)."""
    command = command.split("#", 1)[0].strip().removeprefix(".venv/bin/")
    if "<name>" in command or command == "kvactors bench":
        return None
    command = command.replace("[", " ").replace("]", " ")
    argv = []
    words = command.split()[1:]
    for i, word in enumerate(words):
        if "|" in word:
            word = word.split("|")[0]
        if word == "PATH":  # --trace PATH is a trace, --dir PATH a directory
            word = "conversation" if words[i - 1] == "--trace" else str(ROOT)
        argv.append(SAMPLES.get(word, word))
    return argv


COMMANDS = [(doc, c, argv) for doc, c in documented_commands() if (argv := argv_of(c))]


def test_the_docs_show_every_command_of_the_table() -> None:
    shown_names = {" ".join(argv[:2] if argv[0] == "bench" else argv[:1])
                   for _, _, argv in COMMANDS}  # fmt: skip
    for name in ("demo", "replay", "bench policy", "bench transfer", "bench actors",
                 "bench nvme-index", "bench paged", "bench remote", "bench vllm",
                 "bench soak"):  # fmt: skip
        assert name in shown_names, name


@pytest.mark.parametrize(("doc", "command", "argv"), COMMANDS)
def test_a_documented_command_parses(doc: str, command: str, argv: list[str]) -> None:
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:  # argparse's refusal
        pytest.fail(f"{doc}: `{command}` is refused by the CLI ({exc.code})")
    assert args.command == argv[0]
