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


def test_ctrl_c_of_bench_remote_exits_130_and_stops_its_server() -> None:
    binary = server_binary()
    env = {**os.environ, "KVACTORS_REDIS_SERVER": binary}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    argv = ["bench", "remote", "--sizes", "64", "--mib", "256", "--repeat", "50", "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        server = None
        while server is None and time.monotonic() < deadline and proc.poll() is None:
            names = {c: Path(f"/proc/{c}/cmdline").read_bytes() for c in children(proc.pid)}
            server = next((c for c, n in names.items() if b"server" in n), None)
            time.sleep(0.05)
        assert server is not None, "the bench started no server"
        time.sleep(1.0)  # into the rounds, talking to the server
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr.decode(errors="replace")[-2000:]
    assert stdout == b""
    deadline = time.monotonic() + 10
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(server)


def test_ctrl_c_in_bench_remotes_sharing_phase_is_quiet_and_stops_its_workers() -> None:
    # The sharing figure runs two replay processes; a Ctrl-C then reaches the
    # whole group. Exit 130, no traceback from any process, no worker left.
    binary = server_binary()
    env = {**os.environ, "KVACTORS_REDIS_SERVER": binary}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    argv = ["bench", "remote", "--sizes", "64", "--mib", "1", "--repeat", "1"]
    argv += ["--requests", "12000", "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            names = {c: Path(f"/proc/{c}/cmdline").read_bytes() for c in children(proc.pid)}
            workers = [c for c, n in names.items() if b"--worker" in n]
            time.sleep(0.05)
        assert len(workers) == 2, "the bench started no replay workers"
        time.sleep(1.0)  # the workers are replaying
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = stderr.decode(errors="replace")
    assert proc.returncode == 130, text[-2000:]
    assert stdout == b""
    assert "Traceback" not in text, text[-2000:]
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(w) for w in workers)
