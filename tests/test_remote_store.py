"""The remote medium against real servers: bytes exact across processes, every damaged
or foreign value a miss, a dead or hung server a typed error and then a reconnect,
``maxmemory`` a miss, a 3-node cluster with a node killed mid-run."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _redis import redis_cluster, redis_server, server_binary, shared_server  # noqa: F401
from kvactors.cli.demo import block_bytes_for
from kvactors.config import Config, RemoteConfig
from kvactors.errors import BlocksMissingError, ConfigError, RemoteUnavailable
from kvactors.media.local_server import LocalCluster, LocalServer
from kvactors.media.remote import HEADER_BYTES, RemoteStore, fingerprint
from kvactors.media.remote_wire import (
    READ_WINDOW_BYTES,
    READ_WINDOW_VALUES,
    SEND_BYTES,
    read_window,
    refills,
    send_all,
)

BB = 16 * 1024
CPU = torch.device("cpu")


def rows_for(keys: list[int], bb: int = BB) -> torch.Tensor:
    return block_bytes_for(keys, bb, CPU).clone()


@pytest.fixture
def store(redis_server: LocalServer) -> Iterator[RemoteStore]:  # noqa: F811
    s = RemoteStore("remote", BB, url=redis_server.url, timeout=1.0, retry_after=0.2)
    yield s
    s.close()


def test_round_trip_is_byte_exact(store: RemoteStore) -> None:
    """Blocks written under int and bytes keys read back exactly; absent keys miss."""
    keys: list[int | bytes] = [1, 2, -3, 2**70, b"\x00abc", b"{slot}"]
    rows = torch.randint(0, 256, (len(keys), BB), dtype=torch.uint8)
    store.write_from([], rows, keys)
    assert store.contains([*keys, 99, b"\x01abc"]) == [True] * len(keys) + [False, False]
    out = torch.zeros_like(rows)
    assert store.read_into([], out, keys) == []
    assert torch.equal(out, rows)
    assert store.read_into([], out[:1], [99]) == [0]
    counts = store.counters()
    assert (counts.hits, counts.misses, counts.stored) == (len(keys), 1, len(keys))
    assert counts.bytes_read == counts.bytes_written == len(keys) * BB


def test_read_window_is_deeper_for_values_up_to_64_kib() -> None:
    """Up to 64 KiB a connection keeps 64 GETs out (1 MiB would be 15 at 64 KiB);
    larger values keep 1 MiB of them out, at least one."""
    assert read_window(64 * 1024) == READ_WINDOW_VALUES == 64
    assert read_window(4096) == READ_WINDOW_BYTES // (4096 + HEADER_BYTES) > 64
    assert read_window(128 * 1024) == READ_WINDOW_BYTES // (128 * 1024 + HEADER_BYTES) == 7
    assert read_window(2 * 2**20) == 1


@given(st.integers(0, 600), st.integers(1, 300))
def test_refills_ask_for_each_value_once_in_order_within_the_window(n: int, window: int) -> None:
    """The GETs of an n-value pipeline: the first window at once, then the rest in
    order, each asked for once and before its reply is read; at most window + 1
    out unread, and while any are left to ask for, at least window + 2 - step
    (three quarters of the window) out, with a quarter of the window a write."""
    plan = refills(n, window)
    step = max(1, window // 4)
    asked = min(n, window)
    for j in range(n):
        if j in plan:
            start, end = plan[j]
            assert start == asked
            assert end - start == min(step, n - start)
            asked = end
        assert j < asked <= j + window + 1  # reply j was asked for; the window holds
        if asked < n:
            assert asked - j >= window + 2 - step >= window - window // 4
    assert asked == n
    assert len(plan) == -(-max(0, n - window) // step)


def test_reads_past_a_deep_window_are_byte_exact(redis_server: LocalServer) -> None:  # noqa: F811
    """More 64 KiB blocks than the window holds, read staged and into slots, in
    one pipeline: every one byte-exact, in its own place."""
    bb = 64 * 1024
    n = 3 * read_window(bb) + 5
    s = RemoteStore("remote", bb, url=redis_server.url, namespace=f"win-{uuid.uuid4().hex[:8]}")
    try:
        keys = list(range(n))
        rows = torch.randint(0, 256, (n, bb), dtype=torch.uint8)
        s.write_from([], rows, keys)
        out = torch.zeros_like(rows)
        assert s.read_into([], out, keys[::-1]) == []
        assert torch.equal(out, rows.flip(0))
        slots = torch.zeros_like(rows)
        bufs = [memoryview(slots[i].numpy()) for i in range(n)]
        assert s.read_slots(keys, bufs, keys) == []
        assert torch.equal(slots, rows)
    finally:
        s.close()


def test_int_and_bytes_keys_never_collide(store: RemoteStore) -> None:
    assert store.redis_key(1) != store.redis_key(b"\x01")
    assert store.redis_key(0) != store.redis_key(b"")


def test_store_in_one_process_load_in_another(redis_server: LocalServer) -> None:  # noqa: F811
    """Process A writes blocks and exits; process B reads them byte-exact."""
    keys = list(range(100, 132))
    code = textwrap.dedent(
        f"""
        import sys, torch
        from kvactors.cli.demo import block_bytes_for
        from kvactors.media.remote import RemoteStore
        s = RemoteStore("remote", {BB}, url={redis_server.url!r}, model="m")
        keys = {keys!r}
        if sys.argv[1] == "store":
            s.write_from([], block_bytes_for(keys, {BB}, torch.device("cpu")), keys)
        else:
            out = torch.zeros(len(keys), {BB}, dtype=torch.uint8)
            assert s.read_into([], out, keys) == []
            assert torch.equal(out, block_bytes_for(keys, {BB}, torch.device("cpu")))
            print("exact", len(keys))
        s.close()
        """
    )
    for role in ("store", "load"):
        done = subprocess.run(
            [sys.executable, "-c", code, role], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["exact", str(len(keys))]


def _damage(server: LocalServer, store: RemoteStore, key: int, value: bytes) -> None:
    server.client().set(store.redis_key(key), value)


def test_garbage_truncated_and_foreign_values_are_misses(
    redis_server: LocalServer,  # noqa: F811
    store: RemoteStore,
) -> None:
    """Each damaged value is a counted miss and leaves the destination untouched."""
    keys = [1, 2, 3, 4, 5, 6]
    rows = rows_for(keys)
    store.write_from([], rows, keys)
    c = redis_server.client()
    good = c.get(store.redis_key(1))
    assert len(good) > HEADER_BYTES + BB
    # Garbage; truncated; one byte of the payload flipped; block 1's value under key 4.
    _damage(redis_server, store, 2, b"not a block at all")
    _damage(redis_server, store, 3, c.get(store.redis_key(3))[:-100])
    flipped = bytearray(c.get(store.redis_key(5)))
    flipped[-1] ^= 0x40
    _damage(redis_server, store, 5, bytes(flipped))
    _damage(redis_server, store, 4, good)
    # A value from another namespace (another model's fingerprint) copied in as block 6.
    other = RemoteStore("remote", BB, url=redis_server.url, model="another-model")
    assert other.fingerprint != store.fingerprint
    other.write_from([], rows[5:6], [6])
    _damage(redis_server, store, 6, c.get(other.redis_key(6)))
    other.close()

    out = torch.full_like(rows, 7)
    missed = store.read_into([], out, keys)
    assert missed == [1, 2, 3, 4, 5]
    assert torch.equal(out[0], rows[0])
    assert bool((out[1:] == 7).all())  # never written into
    assert store.counters().corrupt == 5


def _views(rows: torch.Tensor) -> list[memoryview]:
    flat = memoryview(rows.numpy()).cast("B")  # type: ignore[arg-type]
    bb = rows.shape[1]
    return [flat[i * bb : (i + 1) * bb] for i in range(rows.shape[0])]


def test_reads_into_slots_verify_each_value_where_it_landed(
    redis_server: LocalServer,  # noqa: F811
    store: RemoteStore,
) -> None:
    """``read_slots`` (the cache's promotions into its CPU slots) reads each value
    straight into its buffer and checks it there: hits are exact, every value that
    failed a check or is absent is named by the error, and a value of the wrong
    size or with another block's header never reaches its buffer at all."""
    keys = [1, 2, 3, 4, 5, 6]
    rows = rows_for(keys)
    store.write_from([], rows, keys)
    c = redis_server.client()
    _damage(redis_server, store, 2, b"not a block at all")  # wrong size
    flipped = bytearray(c.get(store.redis_key(3)))
    flipped[-1] ^= 0x40  # header fine, payload damaged
    _damage(redis_server, store, 3, bytes(flipped))
    _damage(redis_server, store, 4, c.get(store.redis_key(1)))  # block 1's value
    c.delete(store.redis_key(5))  # absent
    out = torch.full_like(rows, 7)
    with pytest.raises(BlocksMissingError) as info:
        store.read_slots([], _views(out), keys)
    assert sorted(info.value.keys) == [2, 3, 4, 5]
    assert info.value.missing == [5]
    assert torch.equal(out[0], rows[0])
    assert torch.equal(out[5], rows[5])  # the reply after the damaged ones: in step
    for untouched in (1, 3, 4):  # wrong size, another block's header, absent
        assert bool((out[untouched] == 7).all())
    assert store.counters().corrupt == 3
    # fetch(in_place=True) is the same read, telling absent from refused positions.
    out.fill_(7)
    assert store.fetch(keys, _views(out), in_place=True) == ([4], [1, 2, 3])
    assert torch.equal(out[[0, 5]], rows[[0, 5]])
    assert bool((out[[1, 3, 4]] == 7).all())
    # The connection is left at a reply boundary: the next read is exact.
    again = torch.zeros_like(rows[:1])
    assert store.read_slots([], _views(again), [6]) == []
    assert torch.equal(again[0], rows[5])


def test_ready_is_told_each_block_once_it_is_in_its_buffer_verified(
    redis_server: LocalServer,  # noqa: F811
    store: RemoteStore,
) -> None:
    """``ready(i)`` (how a promotion copies blocks out while the next arrive) is
    called in the reading thread, in read order, for each delivered position only,
    and at that moment ``bufs[i]`` already holds block ``keys[i]``'s exact bytes:
    never for an absent or damaged value, in place or through the staging buffer."""
    keys = list(range(1, 41))  # past one read window of 16 KiB values
    rows = rows_for(keys)
    store.write_from([], rows, keys)
    c = redis_server.client()
    flipped = bytearray(c.get(store.redis_key(7)))
    flipped[-1] ^= 0x40  # header fine, payload damaged: lands in place, then fails
    _damage(redis_server, store, 7, bytes(flipped))
    _damage(redis_server, store, 20, b"garbage")
    c.delete(store.redis_key(33))
    for in_place in (True, False):
        out = torch.full_like(rows, 7)
        seen: list[tuple[int, int, bool]] = []  # position, thread, bytes exact then

        def ready(i: int, out: torch.Tensor = out, seen: list[Any] = seen) -> None:
            seen.append((i, threading.get_ident(), torch.equal(out[i], rows[i])))

        absent, refused = store.fetch(keys, _views(out), in_place=in_place, ready=ready)
        assert (absent, refused) == ([32], [6, 19])
        assert [i for i, _, _ in seen] == [i for i in range(len(keys)) if i not in (6, 19, 32)]
        assert {t for _, t, _ in seen} == {threading.get_ident()}
        assert all(exact for _, _, exact in seen)


def test_namespaces_and_models_do_not_see_each_other(redis_server: LocalServer) -> None:  # noqa: F811
    a = RemoteStore("remote", BB, url=redis_server.url, model="llama-8b")
    b = RemoteStore("remote", BB, url=redis_server.url, model="llama-70b")
    c = RemoteStore("remote", BB, url=redis_server.url, namespace="fleet2", model="llama-8b")
    d = RemoteStore("remote", 2 * BB, url=redis_server.url, model="llama-8b")
    a.write_from([], rows_for([1]), [1])
    assert a.contains([1]) == [True]
    assert b.contains([1]) == c.contains([1]) == d.contains([1]) == [False]
    assert fingerprint(BB, "m", "x") != fingerprint(BB, "m", "y")
    for s in (a, b, c, d):
        s.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_damaged_value_is_a_miss(
    shared_server: LocalServer,  # noqa: F811
    data: st.DataObject,
) -> None:
    """Whatever byte of a value is changed, or wherever it is cut, it is never served."""
    bb = 1024
    s = RemoteStore("remote", bb, url=shared_server.url, namespace="hyp")
    try:
        s.write_from([], rows_for([7], bb), [7])
        value = bytearray(shared_server.client().get(s.redis_key(7)))
        if data.draw(st.booleans(), label="truncate"):
            cut = data.draw(st.integers(0, len(value) - 1), label="length")
            damaged = bytes(value[:cut])
        else:
            at = data.draw(st.integers(0, len(value) - 1), label="at")
            value[at] ^= data.draw(st.integers(1, 255), label="xor")
            damaged = bytes(value)
        shared_server.client().set(s.redis_key(7), damaged)
        out = torch.full((1, bb), 3, dtype=torch.uint8)
        assert s.read_into([], out, [7]) == [0]
        assert bool((out == 3).all())
        # Read in place (into a slot nobody else reads): reported all the same.
        with pytest.raises(BlocksMissingError) as info:
            s.read_slots([], _views(out), [7])
        assert info.value.keys == [7]
        assert info.value.missing == []
    finally:
        s.close()


def test_server_killed_and_restarted_mid_stream(redis_server: LocalServer) -> None:  # noqa: F811
    """Killed: calls raise RemoteUnavailable, quickly, then fail fast while it is down;
    restarted on the same port: the store reconnects by itself (the data is gone)."""
    s = RemoteStore("remote", BB, url=redis_server.url, timeout=1.0, retry_after=0.3)
    keys = list(range(8))
    rows = rows_for(keys)
    outcomes: list[str] = []
    deadline = time.monotonic() + 30
    for step in range(60):
        assert time.monotonic() < deadline
        if step == 10:
            redis_server.kill()
        if step == 30:
            redis_server.start()
        t0 = time.monotonic()
        try:
            s.write_from([], rows, keys)
            out = torch.zeros_like(rows)
            missed = s.read_into([], out, keys)
            assert missed == []
            assert torch.equal(out, rows)
            outcomes.append("ok")
        except RemoteUnavailable:
            outcomes.append("down")
            assert s.down == [redis_server.url]
        assert time.monotonic() - t0 < 2.5  # never longer than the timeouts allow
        time.sleep(0.05)
    assert outcomes[:10] == ["ok"] * 10
    assert outcomes[10:30] == ["down"] * 20
    assert outcomes[-1] == "ok"  # reconnected without being told
    assert s.counters().node_failures >= 1
    s.close()


def test_hung_server_times_out(redis_server: LocalServer) -> None:  # noqa: F811
    """A server that stops answering (SIGSTOP) is a RemoteUnavailable after ``timeout``."""
    s = RemoteStore("remote", BB, url=redis_server.url, timeout=0.3, retry_after=0.2)
    s.write_from([], rows_for([1]), [1])
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteUnavailable):
            s.contains([1])
        assert time.monotonic() - t0 < 2.0
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    time.sleep(0.25)
    assert s.contains([1]) == [True]
    s.close()


HUNG_CALLS: dict[str, Any] = {
    "lookup": lambda s, buf: s.contains([1]),
    "lookups": lambda s, buf: s.contains([1, 2]),
    "write": lambda s, buf: s.put([1], buf),
    "read": lambda s, buf: s.fetch([1], buf),
    "delete": lambda s, buf: s.delete([1]),
    "ping": lambda s, buf: s.ping(),
}


@pytest.mark.parametrize("pooled", [True, False])
@pytest.mark.parametrize("call", list(HUNG_CALLS))
def test_a_hung_server_is_waited_on_for_one_timeout_per_call(
    shared_server: LocalServer,  # noqa: F811
    call: str,
    pooled: bool,
) -> None:
    """'A server that is down or hung raises `RemoteUnavailable` (after
    `timeout`)': every call, on a pooled connection or a new one, gives up
    after one `timeout`, never waiting again on a second connection (`ping`
    answers False)."""
    timeout = 0.8
    s = RemoteStore("remote", BB, url=shared_server.url, namespace="hung", timeout=timeout)
    buf = [memoryview(bytearray(BB))]
    proc = shared_server.proc
    assert proc is not None
    try:
        if pooled:
            assert s.put([1], buf) == []
        proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            if call == "ping":
                assert s.ping() is False
            else:
                with pytest.raises(RemoteUnavailable, match="Timeout"):
                    HUNG_CALLS[call](s, buf)
            elapsed = time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGCONT)
        assert timeout <= elapsed < timeout * 1.75
        assert s.down == [shared_server.url]
    finally:
        s.close()


def test_a_connect_that_hangs_is_given_up_after_connect_timeout() -> None:
    """`connect_timeout`: seconds to connect. A server whose listen queue is full
    never completes the connection: the call raises RemoteUnavailable after one
    `connect_timeout`, long before `timeout`."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued = [socket.socket() for _ in range(8)]  # fill the queue, never accepted
        try:
            for sock in queued:
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
            url = f"redis://127.0.0.1:{port}/0"
            s = RemoteStore("remote", BB, url=url, connect_timeout=0.8, timeout=10.0)
            try:
                t0 = time.monotonic()
                with pytest.raises(RemoteUnavailable, match="Timeout connecting"):
                    s.contains([1])
                assert 0.8 <= time.monotonic() - t0 < 0.8 * 1.75
            finally:
                s.close()
        finally:
            for sock in queued:
                sock.close()


def test_closed_connections_are_replaced_and_a_hung_read_is_not_sent_again(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """The server drops every client connection (``CLIENT KILL``): the next write
    and the next read each succeed on a new connection, exact, with no error and
    no node marked down. A read the server does not answer is not sent again
    on a new connection: it fails after one ``timeout``."""
    s = RemoteStore("remote", BB, url=redis_server.url, timeout=0.4, retry_after=0.2)
    keys = list(range(6))
    rows = rows_for(keys)
    s.write_from([], rows, keys)
    out = torch.zeros_like(rows)
    assert s.read_into([], out, keys) == []
    admin = redis_server.client()
    for op in ("write", "read"):
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        if op == "write":
            s.write_from([], rows, keys)
        else:
            out.zero_()
            assert s.read_into([], out, keys) == []
            assert torch.equal(out, rows)
        assert s.down == []
    assert s.counters().node_failures == 0
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteUnavailable):
            s.fetch(keys, _views(out))
        took = time.monotonic() - t0
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert 0.35 < took < 0.75  # one timeout (0.4 s), not two
    s.close()


def test_maxmemory_full_is_misses_not_errors() -> None:
    """allkeys-lru: the server evicts, older blocks miss, every hit is exact.
    noeviction: writes are refused (reported, not raised) and reads still work."""
    bb = 256 * 1024
    keys = list(range(64))  # 16 MiB of values into 4 MiB
    rows = rows_for(keys, bb)
    with LocalServer(binary=server_binary(), maxmemory=4 * 2**20) as server:
        s = RemoteStore("remote", bb, url=server.url)
        for i in range(0, 64, 8):
            s.write_from([], rows[i : i + 8], keys[i : i + 8])
        out = torch.zeros_like(rows)
        missed = s.read_into([], out, keys)
        assert 0 < len(missed) < 64
        hit = [i for i in keys if i not in missed]
        assert torch.equal(out[hit], rows[hit])
        s.close()
    with LocalServer(binary=server_binary(), maxmemory=4 * 2**20, policy="noeviction") as server:
        s = RemoteStore("remote", bb, url=server.url)
        refused: list[int] = []
        for i in range(0, 64, 8):
            views = [memoryview(rows[j].numpy()) for j in range(i, i + 8)]
            refused += [i + pos for pos in s.put(keys[i : i + 8], views)]
        assert 0 < len(refused) < 64
        out = torch.zeros_like(rows)
        missed = s.read_into([], out, keys)
        assert missed == refused
        hit = [i for i in keys if i not in missed]
        assert torch.equal(out[hit], rows[hit])
        s.close()


def test_cluster_spreads_blocks_and_survives_a_dead_node(redis_cluster: LocalCluster) -> None:  # noqa: F811
    """Blocks land on every node by key slot; with one node killed its blocks miss,
    the others' are exact, and no call hangs; with every node down it raises."""
    s = RemoteStore("remote", BB, nodes=redis_cluster.nodes, timeout=1.0, retry_after=0.3)
    keys = list(range(90))
    rows = rows_for(keys)
    s.write_from([], rows, keys)
    per_node = [len(server.client().keys(b"kvactors:*")) for server in redis_cluster.servers]
    assert sum(per_node) == len(keys)
    assert min(per_node) > 10  # spread by slot, not piled on one node
    out = torch.zeros_like(rows)
    assert s.read_into([], out, keys) == []
    assert torch.equal(out, rows)

    victim = redis_cluster.servers[1]
    on_victim = {k for k in keys if s.redis_key(k) in set(victim.client().keys(b"kvactors:*"))}
    victim.kill()
    deadline = time.monotonic() + 30
    for _ in range(5):
        assert time.monotonic() < deadline
        t0 = time.monotonic()
        out = torch.zeros_like(rows)
        missed = s.read_into([], out, keys)
        assert set(missed) == on_victim
        hit = [k for k in keys if k not in on_victim]
        assert torch.equal(out[hit], rows[hit])
        assert bool((out[sorted(on_victim)] == 0).all())
        assert time.monotonic() - t0 < 3.0
        # Writes go on to the live nodes; the dead node's share is reported back.
        assert set(s.put(keys[:10], [memoryview(rows[k].numpy()) for k in keys[:10]])) == {
            i for i, k in enumerate(keys[:10]) if k in on_victim
        }
    for server in redis_cluster.servers:
        server.kill()
    time.sleep(0.35)
    with pytest.raises(RemoteUnavailable):
        s.read_into([], torch.zeros_like(rows), keys)
    s.close()


@pytest.mark.parametrize("victim", [0, 1, 2])
def test_a_hung_cluster_node_is_waited_on_for_one_timeout_per_call(
    redis_cluster: LocalCluster,  # noqa: F811
    victim: int,
) -> None:
    """Failure behaviour, one node of a cluster stops answering (SIGSTOP), whichever
    of the start-up nodes it is: its keys are misses, the other nodes' blocks
    arrive exact, and no call waits longer than about one `timeout` (the slot
    map is reloaded from the other nodes, not from the hung one)."""
    timeout = 0.8
    keys = list(range(60))
    rows = rows_for(keys)
    s = RemoteStore("remote", BB, nodes=redis_cluster.nodes, timeout=timeout, retry_after=0.2)
    server = redis_cluster.servers[victim]
    proc = server.proc
    assert proc is not None
    try:
        s.write_from([], rows, keys)
        on_victim = set(server.client().keys(b"kvactors:*"))
        gone = sorted(i for i, k in enumerate(keys) if s.redis_key(k) in on_victim)
        kept = [i for i in range(len(keys)) if i not in gone]
        assert gone
        proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            out = torch.zeros_like(rows)
            assert s.read_into([], out, keys) == gone
            assert torch.equal(out[kept], rows[kept])
            assert time.monotonic() - t0 < timeout * 1.75
            time.sleep(0.25)  # past retry_after: the hung node is tried again
            t0 = time.monotonic()
            found = s.contains(keys)
            assert [i for i, f in enumerate(found) if not f] == gone
            assert time.monotonic() - t0 < timeout * 1.75
        finally:
            proc.send_signal(signal.SIGCONT)
    finally:
        s.close()


def test_unreachable_server_is_a_typed_error() -> None:
    from kvactors.media.local_server import free_port

    s = RemoteStore("remote", BB, url=f"redis://127.0.0.1:{free_port()}/0", retry_after=5)
    t0 = time.monotonic()
    with pytest.raises(RemoteUnavailable):
        s.contains([1])
    # Within retry_after, calls fail at once without touching the network.
    with pytest.raises(RemoteUnavailable, match="retrying"):
        s.contains([1])
    assert time.monotonic() - t0 < 2.0
    s.close()


def test_a_server_refusing_the_connections_database_is_down_naming_it(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """A URL naming a database the server does not have (`SELECT 99` of 16): every
    call, one key or many, raises RemoteUnavailable with the server's reason and
    the server is left alone for `retry_after`, never a raw ResponseError or a
    lookup answering "absent"."""
    url = redis_server.url.removesuffix("/0") + "/99"
    buf = [memoryview(bytearray(BB))]
    calls: dict[str, Any] = {
        "lookup": lambda s: s.contains([1]),
        "lookups": lambda s: s.contains([1, 2]),
        "write": lambda s: s.put([1], buf),
        "read": lambda s: s.fetch([1], buf),
        "delete": lambda s: s.delete([1]),
    }
    for name, call in calls.items():
        s = RemoteStore("remote", BB, url=url, timeout=1.0, retry_after=30)
        try:
            with pytest.raises(RemoteUnavailable, match="DB index is out of range"):
                call(s)
            assert s.down == [url], name
            assert s.counters().node_failures == 1, name
            with pytest.raises(RemoteUnavailable, match="retrying"):
                call(s)  # left alone: no network
        finally:
            s.close()
    s = RemoteStore("remote", BB, url=url, timeout=1.0)
    try:
        assert s.ping() is False
        assert s.down == [url]
    finally:
        s.close()


def test_bad_settings_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="namespace"):
        RemoteStore("remote", BB, url="redis://127.0.0.1:1/0", namespace="a{b}")
    with pytest.raises(ConfigError, match="url"):
        RemoteStore("remote", BB, url="nonsense://x")
    with pytest.raises(ConfigError, match="nodes"):
        RemoteStore("remote", BB, nodes=["no-port"])
    with pytest.raises(ConfigError, match="timeout"):
        Config.from_dict({"remote": {"timeout": -1}})
    with pytest.raises(ConfigError, match="namespace"):
        RemoteConfig(namespace="has space")
    with pytest.raises(ConfigError, match="write_policy"):
        Config.from_dict({"remote": {"write_policy": "sometimes"}})
    assert Config.from_dict({"remote": {"nodes": ["127.0.0.1:7000"]}}).remote is not None


def test_one_store_serves_many_threads_at_once(store: RemoteStore) -> None:
    """The synchronous API from 8 threads at once (as an engine's workers call it):
    every block written is read back byte-exact by every thread, ``fetch`` tells
    absent from damaged values, and the buffer of a block that missed is untouched."""
    from concurrent.futures import ThreadPoolExecutor

    def views(rows: torch.Tensor) -> list[memoryview]:
        return [memoryview(r.numpy()).cast("B") for r in rows]  # type: ignore[arg-type]

    def worker(t: int) -> int:
        keys = [t * 1000 + i for i in range(24)]
        rows = rows_for(keys)
        assert store.put(keys, views(rows)) == []
        assert store.contains(keys) == [True] * len(keys)
        checked = 0
        for other in range(8):  # others' blocks too, once they are there
            theirs = [other * 1000 + i for i in range(24)]
            out = torch.full((len(theirs), BB), 7, dtype=torch.uint8)
            missed = store.get_into(theirs, views(out))
            for i in range(len(theirs)):
                if i in missed:
                    assert bool((out[i] == 7).all())
                else:
                    assert torch.equal(out[i], rows_for([theirs[i]])[0])
                    checked += 1
        return checked

    with ThreadPoolExecutor(8) as pool:
        checked = list(pool.map(worker, range(8)))
    assert min(checked) >= 24  # each read at least its own blocks
    client = store.nodes.by_name["server"].client
    client.set(store.redis_key(1), b"garbage")
    fresh = torch.full((3, BB), 9, dtype=torch.uint8)
    assert store.fetch([0, 1, 123456], views(fresh)) == ([2], [1])
    assert torch.equal(fresh[0], rows_for([0])[0])
    assert bool((fresh[1:] == 9).all())


def test_a_unix_socket_url_reaches_the_server(tmp_path: Path) -> None:
    """``url = "unix:///path"``: the same store over a Unix socket."""
    sock = tmp_path / "server.sock"
    extra = {"unixsocket": str(sock), "unixsocketperm": "700"}
    with LocalServer(binary=server_binary(), extra=extra) as server:
        s = RemoteStore("remote", BB, url=f"unix://{sock}?db=0")
        rows = rows_for([1, 2, 3])
        s.write_from([], rows, [1, 2, 3])
        out = torch.zeros_like(rows)
        assert s.read_into([], out, [1, 2, 3]) == []
        assert torch.equal(out, rows)
        assert server.client().exists(s.redis_key(2)) == 1  # the same server over TCP
        s.close()


def test_values_expire_after_ttl_and_are_then_misses(store: RemoteStore) -> None:
    """``ttl``: each value is written with ``PX``; once it has expired its read is
    an absent value (a miss, not a damaged one) and the buffer is untouched."""
    s = RemoteStore("remote", BB, url=store.where, namespace="ttl", ttl=0.3)
    rows = rows_for([1, 2])
    s.write_from([], rows, [1, 2])
    out = torch.zeros_like(rows)
    assert s.read_into([], out, [1, 2]) == []
    assert torch.equal(out, rows)
    time.sleep(0.5)
    out = torch.full_like(rows, 9)
    assert s.fetch([1, 2], [memoryview(r.numpy()) for r in out]) == ([0, 1], [])
    assert bool((out == 9).all())
    s.close()


def test_a_cluster_named_by_one_node_url(redis_cluster: LocalCluster) -> None:  # noqa: F811
    """``url`` of any one node with ``cluster = true``: the client learns the rest."""
    url = f"redis://{redis_cluster.nodes[2]}/0"
    s = RemoteStore("remote", BB, url=url, cluster=True)
    keys = list(range(60))
    rows = rows_for(keys)
    s.write_from([], rows, keys)
    per_node = [len(server.client().keys(b"kvactors:*")) for server in redis_cluster.servers]
    assert sum(per_node) == len(keys)
    assert min(per_node) > 0
    out = torch.zeros_like(rows)
    assert s.read_into([], out, keys) == []
    assert torch.equal(out, rows)
    s.close()


def test_a_cluster_node_url_without_cluster_true_is_down_saying_so(
    redis_cluster: LocalCluster,  # noqa: F811
) -> None:
    """`url` naming a node of a cluster without `cluster = true`: the node
    redirects (`MOVED`) the keys of the other nodes' slots. That is no miss and
    no refused write (a third of the blocks silently stored): every call raises
    RemoteUnavailable telling to set `cluster = true`, and the server is down."""
    url = f"redis://{redis_cluster.nodes[0]}/0"
    keys = list(range(24))
    bufs = [memoryview(bytearray(BB)) for _ in keys]
    calls: dict[str, Any] = {
        "write": lambda s: s.put(keys, bufs),
        "lookups": lambda s: s.contains(keys),
        "read": lambda s: s.fetch(keys, bufs),
        "read in place": lambda s: s.fetch(keys, bufs, in_place=True),
    }
    for name, call in calls.items():
        s = RemoteStore("remote", BB, url=url, timeout=1.0, retry_after=30)
        try:
            with pytest.raises(RemoteUnavailable, match="cluster = true"):
                call(s)
            assert s.down == [url], name
        finally:
            s.close()
    cluster = RemoteStore("remote", BB, url=url, cluster=True)
    try:
        assert cluster.put(keys, bufs) == []  # the same URL as a cluster: every block
        assert cluster.contains(keys) == [True] * len(keys)
    finally:
        cluster.close()


def test_one_pipeline_of_writes_carries_at_most_max_batch_bytes(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """``max_batch_bytes``: a large write goes out in pipelines of at most that many
    bytes of values (each block and its header), all of it arriving."""
    s = RemoteStore("remote", BB, url=redis_server.url, max_batch_bytes=5 * BB)
    sent: list[int] = []
    send = s.io.set_batch

    def counting(node: Any, batch: list[int], *rest: Any) -> list[Any]:
        sent.append(len(batch))
        return send(node, batch, *rest)

    s.io.set_batch = counting  # type: ignore[method-assign]
    keys = list(range(23))
    rows = rows_for(keys)
    assert s.put(keys, [memoryview(r.numpy()) for r in rows]) == []
    assert sent == [4, 4, 4, 4, 4, 3]  # each BB and its header: 4 fit in 5 * BB
    assert max(sent) * (BB + HEADER_BYTES) <= 5 * BB
    out = torch.zeros_like(rows)
    assert s.read_into([], out, keys) == []
    assert torch.equal(out, rows)
    s.close()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 3 * 2**16), min_size=1, max_size=40))
def test_gathered_writes_deliver_every_byte_in_order(sizes: list[int]) -> None:
    """``send_all``: gathered writes that the socket takes only in part (a small
    send buffer, a reader draining it meanwhile) resume where they stopped."""
    chunks: list[Any] = []
    for i, size in enumerate(sizes):
        data = bytes([i % 251]) * size
        chunks.append(memoryview(data) if i % 2 else data)
    expected = b"".join(bytes(c) for c in chunks)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.settimeout(10)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(expected):
            part = b.recv(1 << 16)
            if not part:
                return
            got.extend(part)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        send_all(a, list(chunks))
        reader.join(10)
    finally:
        a.close()
        reader.join(10)
        b.close()
    assert not reader.is_alive()
    assert bytes(got) == expected


def test_writes_of_many_small_blocks_span_gathered_writes(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """Blocks smaller than ``SEND_BYTES``, more than one gathered write's worth,
    with and without a ``ttl``: every value arrives whole, in its own key."""
    for ttl in (None, 600.0):
        s = RemoteStore(
            "remote", BB, url=redis_server.url, namespace=f"gather{ttl is None}", ttl=ttl
        )
        keys = list(range(3 * SEND_BYTES // BB + 5))
        rows = rows_for(keys)
        assert s.put(keys, [memoryview(r.numpy()) for r in rows]) == []
        out = torch.zeros_like(rows)
        assert s.read_into([], out, keys) == []
        assert torch.equal(out, rows)
        pttl = redis_server.client().pttl(s.redis_key(keys[-1]))
        assert (pttl == -1) if ttl is None else (0 < pttl <= 600_000)
        s.close()


def test_remote_and_metrics_sections_of_a_config_file(tmp_path: Path) -> None:
    """``[remote]`` and ``[metrics]`` in a TOML file: every key documented in
    docs/remote.md reads into the config; an unknown key is a ConfigError."""
    path = tmp_path / "kv.toml"
    path.write_text(
        textwrap.dedent(
            """
            block_bytes = 65536

            [remote]
            nodes = ["127.0.0.1:7000", "127.0.0.1:7001"]
            cluster = true
            namespace = "fleet"
            model = "llama-3.1-8b-instruct/bf16/tp0"
            layout = "nhd/16"
            num_blocks = 1000
            policy = "arc"
            threads = 2
            write_policy = "on_demotion"
            flush_timeout = 3.0
            connect_timeout = 0.25
            timeout = 1.5
            retry_after = 0.5
            ttl = 600
            max_batch_bytes = 1048576

            [metrics]
            port = 9400
            host = "0.0.0.0"
            """
        )
    )
    config = Config.from_toml(path)
    remote = config.remote
    assert remote is not None
    assert remote.nodes == ["127.0.0.1:7000", "127.0.0.1:7001"]
    assert (remote.cluster, remote.namespace, remote.layout) == (True, "fleet", "nhd/16")
    assert remote.model == "llama-3.1-8b-instruct/bf16/tp0"
    assert (remote.num_blocks, remote.policy, remote.threads) == (1000, "arc", 2)
    assert (remote.write_policy, remote.flush_timeout) == ("on_demotion", 3.0)
    assert (remote.connect_timeout, remote.timeout, remote.retry_after) == (0.25, 1.5, 0.5)
    assert (remote.ttl, remote.max_batch_bytes) == (600, 1048576)
    assert config.metrics is not None
    assert (config.metrics.port, config.metrics.host) == (9400, "0.0.0.0")
    assert [name for name, _ in config.chain()][-1] == "remote"
    path.write_text('[remote]\nurl = "redis://127.0.0.1:6379/0"\nwrite_polcy = "x"\n')
    with pytest.raises(ConfigError, match="write_polcy"):
        Config.from_toml(path)
