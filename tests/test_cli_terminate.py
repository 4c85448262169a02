"""A SIGTERM to a running command (a service manager's or a job scheduler's
stop, ``kill PID``): exit status 143 once the command's clean-up has run, as
README.md promises: nothing on stdout, no traceback, and none of the servers,
child processes and temporary directories it started left behind.

The signal goes to the command's process alone, as ``kill PID`` sends it; its
temporary directories are made under a ``TMPDIR`` of the test's own, so what
is left there is what the command left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen

import pytest

from _redis import server_binary
from test_cli_interrupt import all_gone, children

ROOT = Path(__file__).resolve().parent.parent
MAIN = "import sys; from kvactors.cli import main; sys.exit(main())"


@contextlib.contextmanager
def running(argv: list[str], tmp: Path, *, sigint_ignored: bool = False) -> Iterator[Popen[str]]:
    """``kvactors ARGV`` running with ``TMPDIR=tmp`` (``sigint_ignored``: started
    with SIGINT ignored, as a shell script's background job is); killed on the
    way out if it is still running."""
    env = {**os.environ, "KVACTORS_REDIS_SERVER": server_binary(), "TMPDIR": str(tmp)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", MAIN, *argv]
    if sigint_ignored:  # the shell's trap is inherited across its exec
        cmd = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *cmd]
    proc = Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def sigterm(proc: Popen[str], argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Send ``proc`` SIGTERM and wait (at most 60 s) for how it ends."""
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def terminate(
    argv: list[str],
    tmp: Path,
    ready: Callable[[int], list[int] | None],
    *,
    within: float = 120,
    sigint_ignored: bool = False,
) -> tuple[subprocess.CompletedProcess[str], list[int]]:
    """Run ``kvactors ARGV`` (:func:`running`); once ``ready(pid)`` returns the
    processes to check (a list, maybe empty; ``None``: not yet; at most ``within``
    seconds), let it run one second more and send it SIGTERM."""
    with running(argv, tmp, sigint_ignored=sigint_ignored) as proc:
        found: list[int] | None = None
        deadline = time.monotonic() + within
        while found is None and time.monotonic() < deadline and proc.poll() is None:
            found = ready(proc.pid)
            time.sleep(0.05)
        assert found is not None, f"kvactors {' '.join(argv)} never got ready to be stopped"
        time.sleep(1.0)  # into the work
        return sigterm(proc, argv), found


def made(tmp: Path, prefix: str) -> Callable[[int], list[int] | None]:
    """Ready once the command has made a directory ``prefix*`` in ``tmp`` with a file in it."""

    def ready(pid: int) -> list[int] | None:
        try:
            return [] if any(any(d.iterdir()) for d in tmp.glob(f"{prefix}*")) else None
        except OSError:  # removed as it was listed
            return None

    return ready


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it has exited
        return b""


def check_stopped(done: subprocess.CompletedProcess[str], tmp: Path) -> None:
    assert done.returncode == 143, done.stderr[-3000:]
    assert done.stdout == ""
    assert done.stderr == "", done.stderr[-3000:]  # no traceback, no shutdown noise
    assert list(tmp.iterdir()) == []  # its temporary directories are gone


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["foreground", "background"])
def test_sigterm_of_demo_exits_143_and_removes_its_nvme_directory(
    tmp_path: Path, sigint_ignored: bool
) -> None:
    # The NVMe tier's temporary directory (kvactors-*) is removed by the cache's
    # close, which runs only if the event loop's tasks are cancelled cleanly.
    done, _ = terminate(
        ["demo", "--json"], tmp_path, made(tmp_path, "kvactors-"), sigint_ignored=sigint_ignored
    )
    check_stopped(done, tmp_path)


def test_sigterm_of_bench_remote_exits_143_and_stops_its_server(tmp_path: Path) -> None:
    argv = ["bench", "remote", "--sizes", "64", "--mib", "256", "--repeat", "50", "--json"]

    def server(pid: int) -> list[int] | None:
        found = [c for c in children(pid) if b"server" in cmdline(c)]
        return found[:1] or None

    done, found = terminate(argv, tmp_path, server)
    check_stopped(done, tmp_path)  # the server's directory (kvactors-redis-*) too
    assert all_gone(found)


def test_sigterm_in_bench_remotes_sharing_phase_stops_its_workers(tmp_path: Path) -> None:
    argv = ["bench", "remote", "--sizes", "64", "--mib", "1", "--repeat", "1"]
    argv += ["--requests", "12000", "--json"]

    def both_workers(pid: int) -> list[int] | None:
        kids = children(pid)
        workers = [c for c in kids if b"--worker" in cmdline(c)]
        return kids if len(workers) == 2 else None  # the server too

    done, found = terminate(argv, tmp_path, both_workers)
    check_stopped(done, tmp_path)
    assert all_gone(found)


def test_sigterm_of_a_command_outside_an_event_loop_exits_143(tmp_path: Path) -> None:
    # bench nvme-index runs no event loop: the SIGTERM is a KeyboardInterrupt in
    # its synchronous code, whose clean-up removes the index directory.
    done, _ = terminate(
        ["bench", "nvme-index", "--json"], tmp_path, made(tmp_path, "kvactors-bench-index-")
    )
    check_stopped(done, tmp_path)


def catches_sigterm(pid: int) -> bool:
    """Whether ``pid`` has a handler installed for SIGTERM (Linux /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def test_sigterm_while_the_command_starts_exits_143_without_a_traceback(tmp_path: Path) -> None:
    # At once after the handler is in place: the command is still loading its
    # modules (torch for demo) or just starting; either way 143, nothing printed.
    with running(["demo", "--json"], tmp_path) as proc:
        deadline = time.monotonic() + 60
        while not catches_sigterm(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.001)
        assert catches_sigterm(proc.pid), "kvactors demo never set its SIGTERM handler"
        check_stopped(sigterm(proc, []), tmp_path)


def test_sigterm_while_bench_remote_starts_its_server_stops_that_server(tmp_path: Path) -> None:
    # The moment the server process exists, before it answers: the bench is
    # still waiting for it inside LocalServer.start, which must stop it too.
    argv = ["bench", "remote", "--sizes", "64", "--mib", "1", "--repeat", "1", "--json"]
    with running(argv, tmp_path) as proc:
        server: list[int] = []
        deadline = time.monotonic() + 60
        while not server and time.monotonic() < deadline and proc.poll() is None:
            server = [c for c in children(proc.pid) if b"server" in cmdline(c)]
        assert server, "bench remote started no server"
        check_stopped(sigterm(proc, argv), tmp_path)
    assert all_gone(server)


def test_sigterm_while_bench_remote_starts_a_replay_process_stops_it(tmp_path: Path) -> None:
    # The moment the sharing figure's first replay process exists: the bench may
    # still be inside subprocess.Popen for it, and must stop it all the same.
    argv = ["bench", "remote", "--sizes", "64", "--mib", "1", "--repeat", "1"]
    argv += ["--requests", "12000", "--json"]
    with running(argv, tmp_path) as proc:
        found: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            kids = children(proc.pid)
            if any(b"--worker" in cmdline(c) for c in kids):
                found = kids  # the server and the replay process
                break
        assert found, "bench remote started no replay process"
        check_stopped(sigterm(proc, argv), tmp_path)
    assert all_gone(found)
