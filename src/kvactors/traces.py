"""Request traces in the Mooncake JSONL format, and the copies shipped with kvactors.

One JSON object per line::

    {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2]}

``timestamp`` is the arrival time in ms, the lengths count tokens, and
``hash_ids`` are chained prefix-block hashes (512 tokens per block): equal ids
at the same position mean a reusable KV prefix. Other fields are ignored;
blank lines are skipped, and so is a UTF-8 byte-order mark at the start.
The bundled traces come from the Mooncake project's FAST'25 release
(see ``kvactors/data/README.md``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec

from kvactors.errors import TraceError

__all__ = ["BUNDLED_TRACES", "TraceError", "TraceRequest", "bundled_trace", "load_trace"]

BUNDLED_TRACES = ("conversation", "synthetic")
"""Names accepted by :func:`bundled_trace`."""

_DATA = Path(__file__).resolve().parent / "data"

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class TraceRequest(msgspec.Struct, frozen=True):
    """One request of a trace: when it arrived, its lengths and its prefix blocks."""

    timestamp: NonNegative | Annotated[float, msgspec.Meta(ge=0)]
    input_length: NonNegative
    output_length: NonNegative
    hash_ids: list[int]


_decoder = msgspec.json.Decoder(TraceRequest)
_BOM = b"\xef\xbb\xbf"


def load_trace(path: str | os.PathLike[str]) -> list[TraceRequest]:
    """Read every request of the JSONL trace at ``path``, in file order.

    Raises :class:`TraceError` when the file cannot be read, and for the first
    malformed line: not JSON, a missing or mistyped field, a negative length
    or timestamp, or a block id named twice in one request. The message gives
    ``path:line`` and the field.
    """
    try:
        with open(path, "rb") as f:
            lines = f.readlines()
    except OSError as exc:
        raise TraceError(f"cannot read trace {os.fspath(path)!r}: {exc.strerror}") from exc
    if lines and lines[0].startswith(_BOM):
        lines[0] = lines[0][len(_BOM) :]  # a UTF-8 byte-order mark, as some editors write
    requests: list[TraceRequest] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            request = _decoder.decode(line)
        except msgspec.ValidationError as exc:
            raise TraceError(f"{os.fspath(path)}:{lineno}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise TraceError(f"{os.fspath(path)}:{lineno}: not valid JSON ({exc})") from None
        ids = request.hash_ids
        if len(set(ids)) != len(ids):
            raise TraceError(
                f"{os.fspath(path)}:{lineno}: block id {_first_repeat(ids)} "
                "is named twice in `$.hash_ids`"
            )
        requests.append(request)
    return requests


def _first_repeat(ids: list[int]) -> int:
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    raise AssertionError("no repeated id")


def bundled_trace(name: str = "conversation") -> Path:
    """The path of the bundled trace ``name`` (one of :data:`BUNDLED_TRACES`).

    Raises :class:`TraceError` for an unknown name, listing the known ones.
    """
    if name not in BUNDLED_TRACES:
        known = ", ".join(BUNDLED_TRACES)
        raise TraceError(f"unknown bundled trace {name!r}; bundled: {known}")
    return _DATA / f"mooncake_{name}.jsonl"
