"""``kvactors bench``: speed benchmarks, one module per subcommand (a long one's
parts in modules named after it, such as ``transfer_cold``; a baseline two of
them share in ``baseline``).

Each module exposes ``add_arguments(parser)`` and ``run(args) -> Report`` and
is registered in :data:`kvactors.cli.BENCHES`. A benchmark prints its figures
beside a baseline measured in the same run (the ratio is what to compare
across machines), and states whether its goals are met.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kvactors.errors import ConfigError

__all__ = ["work_directory"]


def work_directory(path: str | None, prefix: str) -> Path:
    """The directory of a benchmark's ``--dir`` (made if missing), or a new
    temporary one; a path that is a file or cannot be made is a ConfigError."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--dir: cannot use {path!r} as a directory: {exc.strerror}") from exc
    return directory
