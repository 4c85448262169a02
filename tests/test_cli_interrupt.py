"""Ctrl-C of a long command: exit status 130, nothing half-printed on stdout
(so ``--json`` output is never a broken object), and nothing left running.

A terminal's Ctrl-C is a SIGINT to the whole foreground process group; the
tests send it the same way, to a command started in a group of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _redis import server_binary

ROOT = Path(__file__).resolve().parent.parent
MAIN = "import sys; from kvactors.cli import main; sys.exit(main())"


def children(pid: int) -> list[int]:
    """The ids of ``pid``'s child processes (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def ctrl_c(
    argv: list[str], ready: Callable[[dict[int, bytes]], list[int]], within: float
) -> tuple[subprocess.CompletedProcess[bytes], list[int]]:
    """Run ``kvactors ARGV`` in a process group of its own; once ``ready`` finds
    the processes to wait for among its children (``{pid: cmdline}``, at most
    ``within`` seconds), let it run one second more and send the group SIGINT.
    Returns how the command ended and the processes ``ready`` found."""
    env = {**os.environ, "KVACTORS_REDIS_SERVER": server_binary()}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    found: list[int] = []
    try:
        deadline = time.monotonic() + within
        while not found and time.monotonic() < deadline and proc.poll() is None:
            found = ready({c: Path(f"/proc/{c}/cmdline").read_bytes() for c in children(proc.pid)})
            time.sleep(0.05)
        assert found, f"kvactors {' '.join(argv)} started none of the processes looked for"
        time.sleep(1.0)  # into the work, with them running
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr), found


def all_gone(pids: list[int]) -> bool:
    """Whether every one of ``pids`` has exited within 10 seconds."""
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


def test_ctrl_c_of_bench_remote_exits_130_and_stops_its_server() -> None:
    argv = ["bench", "remote", "--sizes", "64", "--mib", "256", "--repeat", "50", "--json"]
    done, server = ctrl_c(
        argv, lambda names: [c for c, n in names.items() if b"server" in n][:1], 60
    )
    assert done.returncode == 130, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout == b""
    assert all_gone(server)


def test_ctrl_c_in_bench_remotes_sharing_phase_is_quiet_and_stops_its_workers() -> None:
    # The sharing figure runs two replay processes; a Ctrl-C then reaches the
    # whole group. Exit 130, no traceback from any process, no worker left.
    argv = ["bench", "remote", "--sizes", "64", "--mib", "1", "--repeat", "1"]
    argv += ["--requests", "12000", "--json"]

    def both_workers(names: dict[int, bytes]) -> list[int]:
        workers = [c for c, n in names.items() if b"--worker" in n]
        return workers if len(workers) == 2 else []

    done, workers = ctrl_c(argv, both_workers, 120)
    text = done.stderr.decode(errors="replace")
    assert done.returncode == 130, text[-2000:]
    assert done.stdout == b""
    assert "Traceback" not in text, text[-2000:]
    assert all_gone(workers)
