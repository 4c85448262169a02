"""Configuration: one msgspec ``Config`` for the whole cache, loadable from TOML.

Every value is checked when the config is built or loaded; a wrong one raises
:class:`~kvactors.errors.ConfigError` whose message names the field
(``cpu.num_blocks``, ``nvme.threads``, ...).
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypeGuard

import msgspec

from kvactors.errors import ConfigError, UnknownPolicyError
from kvactors.manager import MAX_BLOCKS
from kvactors.policy import POLICIES

if TYPE_CHECKING:
    from kvactors.media.base import BlockMedium

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEVICE_NAMES",
    "MAX_BLOCKS",
    "REMOTE_SCHEMES",
    "TIERS",
    "Config",
    "GPUConfig",
    "MetricsConfig",
    "NVMeConfig",
    "RemoteConfig",
    "TierConfig",
    "TierSpec",
    "is_device_name",
    "path_problem",
    "positive_seconds",
]


Positive = Annotated[int, msgspec.Meta(ge=1)]
MAX_THREADS = 1024
"""Worker threads of one tier, and NVMe stripes, at most (each is a task or a file)."""
MAX_INFLIGHT = 65536
"""Requests the coordinator runs at once, at most (each is a task)."""
Threads = Annotated[int, msgspec.Meta(ge=1, le=MAX_THREADS)]
Inflight = Annotated[int, msgspec.Meta(ge=1, le=MAX_INFLIGHT)]
Blocks = Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCKS)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]

KiB = 1024
MiB = 1024 * KiB

MAX_INLINE_BYTES = 4 * MiB
InlineBytes = Annotated[int, msgspec.Meta(ge=0, le=MAX_INLINE_BYTES)]


_BOUNDS = {
    "num_blocks": MAX_BLOCKS,
    "threads": MAX_THREADS,
    "stripes": MAX_THREADS,
    "max_inflight": MAX_INFLIGHT,
}


def _check_positive(obj: msgspec.Struct, *names: str) -> None:
    # msgspec checks ``Meta`` bounds only when decoding; direct construction
    # (``TierConfig(num_blocks=0)``) is checked here with the same message.
    for name in names:
        value = getattr(obj, name)
        if type(value) is not int or value < 1:
            raise ConfigError(f"{name}: expected an int >= 1, got {value!r}")
        bound = _BOUNDS.get(name)
        if bound is not None and value > bound:
            raise ConfigError(f"{name}: expected an int <= {bound}, got {value!r}")


@functools.cache
def _field_types(cls: type[msgspec.Struct]) -> tuple[tuple[str, Any, tuple[type, ...], bool], ...]:
    """Per field: its name, type, the struct types it may hold and whether
    ``None`` is allowed there."""
    fields = []
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        structs = tuple(m for m in members if isinstance(m, type) and issubclass(m, msgspec.Struct))
        fields.append((name, hint, structs, type(None) in members))
    return tuple(fields)


def _check_types(obj: msgspec.Struct) -> None:
    # Direct construction (``Config(write_mode="nope")``, ``TierConfig(policy=3)``)
    # checks no type: every field is checked here as decoding checks it, and a
    # section must be its struct (or None where allowed), not a dict.
    for name, hint, structs, optional in _field_types(type(obj)):
        value = getattr(obj, name)
        if structs:
            if not isinstance(value, structs) and not (value is None and optional):
                allowed = " or ".join([s.__name__ for s in structs] + ["None"] * optional)
                raise ConfigError(f"{name}: expected {allowed}, got {type(value).__name__}")
            continue
        try:
            msgspec.convert(value, hint)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{name}: {_field_message(exc)}") from None


class TierSpec(Protocol):
    """What one tier of the chain below the GPU pool needs from its config entry.

    A tier is one config entry (a struct with these fields and ``open_medium``),
    one medium (a :class:`~kvactors.media.BlockMedium`) and one tier actor,
    which ``kvactors.open`` makes for every entry of :data:`TIERS` that is set.
    """

    num_blocks: int
    policy: str
    threads: int

    def open_medium(self, name: str, config: Config) -> BlockMedium:
        """Make (and open) this tier's medium; raise ConfigError / a startup error."""
        ...


class GPUConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The engine-side pool that stores copy from and loads copy into.

    ``device``: ``"auto"`` picks ``cuda`` when available, else ``cpu`` (same code).
    """

    num_blocks: Blocks = 256
    device: str = "auto"
    threads: Threads = 2

    def __post_init__(self) -> None:
        _check_positive(self, "num_blocks", "threads")
        _check_types(self)


class TierConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The CPU tier: ``num_blocks`` slots ordered by ``policy``."""

    num_blocks: Blocks = 1024
    policy: str = "lru"
    threads: Threads = 2

    def __post_init__(self) -> None:
        _check_positive(self, "num_blocks", "threads")
        _check_types(self)

    def open_medium(self, name: str, config: Config) -> BlockMedium:
        import torch

        from kvactors.media import MemoryPool

        return MemoryPool(name, self.num_blocks, config.block_bytes, torch.device("cpu"), True)


class NVMeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The NVMe tier. ``directory=None`` uses a temporary directory removed on close.

    ``backend``: ``"auto"`` uses kvikio where the CUDA driver loads, POSIX I/O in
    worker threads otherwise; ``"posix"`` or ``"kvikio"`` force one.
    ``stripes``: files the block slots are spread over, round robin; buffered
    writes to one file serialise on its inode lock, so writes to different files
    run in parallel. A directory is reopened with the stripes it was made with.
    ``io``: ``"direct"`` reads and writes the block files with ``O_DIRECT``
    (past the page cache, several requests in flight at once; blocks a multiple
    of 4096 bytes); ``"buffered"`` through the page cache; ``"auto"`` is direct
    for a named directory whose file system takes ``O_DIRECT`` with such
    blocks, buffered otherwise (a temporary directory, a tmpfs).
    """

    num_blocks: Blocks = 4096
    policy: str = "lru"
    directory: str | None = None
    backend: Literal["auto", "posix", "kvikio"] = "auto"
    threads: Threads = 4
    stripes: Threads = 2
    io: Literal["auto", "direct", "buffered"] = "auto"

    def __post_init__(self) -> None:
        _check_positive(self, "num_blocks", "threads", "stripes")
        _check_types(self)
        if self.directory is not None and not self.directory.strip():
            # An empty path would put the tier's files in the working directory.
            raise ConfigError("directory: empty; leave it out (None) for a temporary directory")
        problem = None if self.directory is None else path_problem(self.directory)
        if problem is not None:
            raise ConfigError(f"directory: {problem}, got {self.directory!r}")

    def open_medium(self, name: str, config: Config) -> BlockMedium:
        from kvactors.media import FileStore, resolve_nvme_backend

        # A temporary directory dies with the process: no fsync needed there.
        return FileStore(
            name,
            self.num_blocks,
            config.block_bytes,
            self.directory,
            durable=self.directory is not None,
            backend=resolve_nvme_backend(self.backend),
            io_threads=max(2, self.stripes),
            stripes=self.stripes,
            io=self.io,
        )


def path_problem(path: str) -> str | None:
    """Why the file system cannot name ``path`` (``None``: it can). The OS takes
    a path as bytes: a NUL byte would end it early and a lone surrogate has no
    encoding, so either would fail only at open, as a bare ``ValueError`` /
    ``UnicodeEncodeError`` naming no field."""
    try:
        encoded = os.fsencode(path)
    except UnicodeEncodeError as exc:
        return f"not a path the file system can name ({exc.reason} at position {exc.start})"
    if b"\0" in encoded:
        return f"not a path: it holds a NUL byte at position {path.index(chr(0))}"
    return None


def namespace_ok(namespace: object) -> bool:
    """Whether ``namespace`` can prefix a remote tier's server keys: a non-empty
    ``str`` with no braces (cluster hash tags), colons (the key's separator),
    white space or control characters."""
    return (
        isinstance(namespace, str)
        and bool(namespace)
        and not any(c in "{}:" or c.isspace() or not c.isprintable() for c in namespace)
    )


TIERS: tuple[str, ...] = ("cpu", "nvme", "remote")
"""The chain below the GPU pool, top first: each name is a field of :class:`Config`
holding a :class:`TierSpec` (or ``None``: not configured). Stores land in the
first; blocks evicted from one tier move down to the next."""


DEVICE_NAMES = "'auto', 'cpu', 'cuda' or 'cuda:N'"
"""The device settings there are, as errors list them."""


def is_device_name(name: object) -> TypeGuard[str]:
    """Whether ``name`` is a device setting: ``"auto"``, ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``, ``N`` a device number as torch writes it (ASCII digits, no sign,
    space or leading zero: ``"cuda:01"`` is not one)."""
    if not isinstance(name, str):
        return False
    if name in ("auto", "cpu", "cuda"):
        return True
    number = name.removeprefix("cuda:")
    return (
        number != name
        and number.isascii()
        and number.isdigit()
        and (number == "0" or not number.startswith("0"))
    )


def positive_seconds(value: object) -> TypeGuard[int | float]:
    """A finite number of seconds > 0 (NaN and infinity never bound a wait; an
    int past a float's range cannot be one either)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:
        return False


REMOTE_SCHEMES = ("redis://", "rediss://", "unix://")


class RemoteConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The remote tier: a Valkey / Redis server or cluster shared by many engines
    (see docs/remote.md).

    - ``url``: one server, ``redis://host:port/db`` (``unix:///path`` for a
      socket; ``rediss://`` is handed to redis-py for TLS); with
      ``cluster = true`` one node of a cluster (database 0, over TCP). A URL
      redis-py cannot use as written (a bad port or database path, a query
      argument it does not take) is a ConfigError naming ``remote.url``.
    - ``nodes``: ``["host:port", ...]`` start-up nodes of a cluster (overrides ``url``).
    - ``username`` / ``password``: authenticate to the server, or to every node
      of a cluster (an ACL user, or ``requirepass`` with ``username`` unset);
      ``url`` may carry them instead (``redis://user:pw@host``), not both (a
      ConfigError). Never shown: a password appears as ``***`` in this struct's
      repr and in every message and figure naming the server.
    - ``namespace``: prefix of every key; with ``model`` (the model identity:
      name, revision, dtype, parallel rank, ...) and ``layout`` (anything else
      that shapes a block's bytes) and ``block_bytes`` it makes the key space,
      so engines share blocks exactly when their bytes are compatible.
    - ``connect_timeout`` / ``timeout``: seconds to connect / for one reply;
      past them the server is marked down. ``retry_after``: seconds a down
      server is left alone before the next call tries it again.
    - ``num_blocks``: blocks of the server this cache keeps track of (those it
      wrote or found there); the least recently used are forgotten, not deleted.
      ``policy``: the order in which they are forgotten.
    - ``threads``: worker threads (and connections) of the remote tier.
    - ``write_policy``: ``"write_through"`` writes every stored block to the
      server at once (other engines see it at once); ``"on_demotion"`` writes
      blocks when they leave the tier above, and those still held above it
      when the cache closes (within ``flush_timeout``).
    - ``flush_timeout``: under ``"on_demotion"``, seconds closing the cache may
      spend writing the blocks still held above the remote tier to the server
      (``KVCache.flushed`` says what was written, failed or left).
    - ``ttl``: seconds a value lives on the server (``None``: until evicted).
    - ``max_batch_bytes``: values carried by one pipeline at most.
    """

    url: str | None = "redis://127.0.0.1:6379/0"
    nodes: list[str] = []
    num_blocks: Blocks = 262144
    policy: str = "lru"
    cluster: bool = False
    username: str | None = None
    password: str | None = None
    namespace: str = "kvactors"
    model: str = ""
    layout: str = ""
    connect_timeout: float = 0.5
    timeout: float = 2.0
    retry_after: float = 1.0
    threads: Threads = 4
    write_policy: Literal["write_through", "on_demotion"] = "write_through"
    flush_timeout: float = 10.0
    ttl: float | None = None
    max_batch_bytes: Positive = 64 * MiB

    def __post_init__(self) -> None:
        _check_positive(self, "num_blocks", "threads", "max_batch_bytes")
        for name in ("connect_timeout", "timeout", "retry_after", "flush_timeout"):
            value = getattr(self, name)
            if not positive_seconds(value):
                raise ConfigError(f"{name}: expected seconds > 0, got {value!r}")
        if self.ttl is not None and not positive_seconds(self.ttl):
            raise ConfigError(f"ttl: expected seconds > 0 or none, got {self.ttl!r}")
        _check_types(self)
        if self.url is None and not self.nodes:
            raise ConfigError("remote.url: give url or nodes")
        from kvactors.media.remote_nodes import (
            check_credentials,
            check_scheme,
            check_url,
            parse_node,
        )

        if self.url is not None:
            check_scheme(self.url)
        for node in self.nodes:
            parse_node(node)  # ConfigError naming remote.nodes
        check_credentials(self.url, self.nodes, self.username, self.password)
        if self.url is not None and not self.nodes:
            check_url(self.url, self.cluster)  # the URL used: ConfigError naming remote.url
        if not namespace_ok(self.namespace):
            raise ConfigError(
                f"namespace: expected a non-empty name without braces, colons, "
                f"white space or control characters, got {self.namespace!r}"
            )

    def masked(self) -> dict[str, Any]:
        """The fields by name, in order, with the password shown as ``***``
        (the ``password`` key's and the URL's): what a repr or a report shows."""
        from kvactors.media.remote import masked_url

        shown = {f: getattr(self, f) for f in self.__struct_fields__}
        shown["url"] = None if self.url is None else masked_url(self.url)
        shown["password"] = None if self.password is None else "***"
        return shown

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={v!r}" for f, v in self.masked().items())
        return f"RemoteConfig({fields})"

    def open_medium(self, name: str, config: Config) -> BlockMedium:
        from kvactors.media.remote import RemoteStore

        return RemoteStore(
            name,
            config.block_bytes,
            url=self.url,
            nodes=self.nodes,
            cluster=self.cluster,
            username=self.username,
            password=self.password,
            namespace=self.namespace,
            model=self.model,
            layout=self.layout,
            connect_timeout=self.connect_timeout,
            timeout=self.timeout,
            retry_after=self.retry_after,
            max_batch_bytes=self.max_batch_bytes,
            ttl=self.ttl,
            num_blocks=self.num_blocks,
        )


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Prometheus metrics of every tier (``kvactors.cache.metrics``): with ``port``
    set, ``kvactors.open`` serves them over HTTP on ``host:port`` (``0``: any free port)."""

    port: Port | None = None
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        port = self.port
        if port is not None and (type(port) is not int or not 0 <= port <= 65535):
            raise ConfigError(f"port: expected a TCP port 0..65535 or none, got {port!r}")
        _check_types(self)
        if not self.host.strip():
            # No address: the exporter could not listen anywhere (not "every interface").
            raise ConfigError(
                f"host: expected an address to listen on (127.0.0.1; 0.0.0.0 for every "
                f"interface), got {self.host!r}"
            )


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Everything ``kvactors.open`` needs.

    - ``block_bytes``: bytes of one offload block (all tiers share it).
    - ``write_mode``: ``"write_back"`` demotes blocks evicted from CPU to NVMe;
      ``"write_through"`` also writes every stored block to NVMe at once.
    - ``mailbox_size``: bound of every actor's mailbox (commands wait for room,
      hints are dropped). ``max_inflight``: requests the coordinator runs at once.
    - ``nvme=None`` runs with GPU and CPU tiers only.
    - ``remote``: a Valkey / Redis tier after the local ones (``None``: none).
    - ``metrics``: Prometheus metrics over HTTP (``None``: not served).
    - ``inline_bytes``: host memory-to-memory copies (GPU pool <-> CPU tier,
      user tensors) of at most this many bytes run on the event loop instead
      of a worker thread (default and maximum 4 MiB: a thread hop costs a
      quarter to a half of such a copy, and the loop is held at most for one
      such copy). ``0`` sends every copy to a thread. File I/O and CUDA copies
      always run in threads.
    - ``move_bytes=False``: a metadata-only cache, for replaying traces through
      the real actors: every handshake is planned, routed to its tier actors and
      completed as usual, but no byte is copied, and ``src`` / ``dst`` are
      ``None``. Pools are still allocated: use a small ``block_bytes``.
    - ``TIERS`` (module level) orders the chain below the GPU pool (``cpu``,
      ``nvme``, ``remote``); ``chain()`` lists the tiers set.
    """

    block_bytes: Positive = 64 * KiB
    gpu: GPUConfig = GPUConfig()
    cpu: TierConfig = TierConfig()
    nvme: NVMeConfig | None = NVMeConfig()
    write_mode: Literal["write_back", "write_through"] = "write_back"
    mailbox_size: Positive = 256
    max_inflight: Inflight = 32
    event_buffer: NonNegative = 1024
    inline_bytes: InlineBytes = 4 * MiB
    move_bytes: bool = True
    remote: RemoteConfig | None = None
    metrics: MetricsConfig | None = None

    def __post_init__(self) -> None:
        _check_positive(self, "block_bytes", "mailbox_size", "max_inflight")
        if type(self.event_buffer) is not int or self.event_buffer < 0:
            raise ConfigError(f"event_buffer: expected an int >= 0, got {self.event_buffer!r}")
        if self.cpu is None:
            raise ConfigError("cpu: the CPU tier is required (stores land there)")
        value = self.inline_bytes
        if type(value) is not int or not 0 <= value <= MAX_INLINE_BYTES:
            raise ConfigError(
                f"inline_bytes: expected an int from 0 to {MAX_INLINE_BYTES} (4 MiB), got {value!r}"
            )
        _check_types(self)
        for field, tier in self.chain():
            if tier.policy not in POLICIES:
                known = ", ".join(sorted(POLICIES))
                raise UnknownPolicyError(
                    f"{field}.policy: unknown policy {tier.policy!r}; supported: {known}"
                )
        if not is_device_name(self.gpu.device):
            raise ConfigError(f"gpu.device: expected {DEVICE_NAMES}, got {self.gpu.device!r}")

    def chain(self) -> list[tuple[str, TierSpec]]:
        """The tiers below the GPU pool that this config sets, top (fastest) first."""
        chain: list[tuple[str, TierSpec]] = []
        for name in TIERS:
            spec = getattr(self, name)
            if spec is not None:
                chain.append((name, spec))
        return chain

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build a config from plain data (as parsed from TOML or JSON).

        A section that may be ``None`` (``nvme``, ``remote``, ``metrics``) is
        turned off with ``false`` as well: TOML has no null."""
        if isinstance(data, dict):
            off = [k for k in _OPTIONAL_SECTIONS if data.get(k) is False]
            if off:
                data = {**data, **dict.fromkeys(off)}
            for name in _OPTIONAL_SECTIONS:
                if data.get(name) is True:
                    raise ConfigError(
                        f"invalid config: {name}: expected a table of its settings, "
                        f"or false for none, got true"
                    )
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            # A policy name raised from __post_init__ keeps its own type.
            error = (
                UnknownPolicyError if isinstance(exc.__cause__, UnknownPolicyError) else ConfigError
            )
            raise error(f"invalid config: {_field_message(exc)}") from None

    @classmethod
    def from_toml(cls, path: str | Path) -> Config:
        """Load a config from a TOML file; unknown keys and wrong values raise ConfigError."""
        if not isinstance(path, (str, bytes, os.PathLike)):
            # An int would be read as an open file descriptor (and closed).
            raise ConfigError(f"from_toml: expected a path, got {type(path).__name__}")
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
        except ValueError as exc:  # from open: a NUL byte, a lone surrogate
            raise ConfigError(f"cannot read config {path!r}: not a path: {exc}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied and validated."""
        data = msgspec.to_builtins(self)
        for name, value in changes.items():
            try:
                data[name] = msgspec.to_builtins(value)
            except TypeError as exc:  # a value no config field can hold (an object)
                raise ConfigError(f"invalid config: {name}: {exc}") from None
        return Config.from_dict(data)


_OPTIONAL_SECTIONS = tuple(
    name for name, _, structs, optional in _field_types(Config) if structs and optional
)
"""The sections of :class:`Config` that may be ``None`` (``false`` in TOML)."""


_UNKNOWN = re.compile(r"Object contains unknown field `(.*)`")


def _known(where: str) -> str:
    """The keys of the config section at dotted path ``where`` ("": the top level)."""
    cls: type[msgspec.Struct] = Config
    for part in where.split(".") if where else []:
        cls = next(st[0] for name, _, st, _ in _field_types(cls) if name == part)
    return ", ".join(cls.__struct_fields__)


def _field_message(exc: msgspec.ValidationError) -> str:
    # msgspec says "Expected `int` >= 1, got `0` - at `$.cpu.num_blocks`"; lead
    # with the field path, as users scan for it first. A section's own check
    # (its __post_init__'s ConfigError, "directory: empty") is reported at the
    # section's path (`$.nvme`): its field joins that path ("nvme.directory").
    text = str(exc)
    head, sep, where = text.rpartition(" - at `$.")
    if not sep:
        head, where = text, ""
    where = where.rstrip("`")
    unknown = _UNKNOWN.fullmatch(head)
    if unknown is not None:
        # A key no field has (a typo, a key of another section or an older
        # layout): named by its path, with the keys that section does have.
        return f"{where + '.' if where else ''}{unknown[1]}: unknown key; known: {_known(where)}"
    if not where:
        return text
    if isinstance(exc.__cause__, ConfigError):
        if head.startswith(f"{where}."):
            return head  # the check named the path itself ("remote.nodes")
        name, colon, _ = head.partition(": ")
        if colon and name.isidentifier():
            return f"{where}.{head}"
    return f"{where}: {head}"
