"""``kv_connector_extra_config`` of the kvactors vLLM backend: parsed, checked, typed.

No vLLM import: the settings are plain data, shared by the scheduler and the
worker process (each parses the same dict).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kvactors.config import (
    MAX_BLOCKS,
    MAX_THREADS,
    REMOTE_SCHEMES,
    namespace_ok,
    path_problem,
    positive_seconds,
)
from kvactors.errors import ConfigError
from kvactors.media.remote_nodes import check_credentials, check_url, masked_url, parse_node
from kvactors.policy import POLICIES

__all__ = [
    "SPEC_MODULE",
    "SPEC_NAME",
    "VLLM_KEYS",
    "VLLMSettings",
    "nvme_io_backend",
    "parse_settings",
]

SPEC_MODULE = "kvactors.vllm"
SPEC_NAME = "KVActorsOffloadingSpec"

VLLM_KEYS = frozenset(
    {
        "spec_name",
        "spec_module_path",
        "blocks_per_chunk",
        "block_size",
        "offload_prompt_only",
        "self_describing_kv_events",
        "canonical_layout",
    }
)
"""Keys of ``kv_connector_extra_config`` that vLLM's ``OffloadingConnector`` reads itself."""

WRITE_MODES = ("back", "through")


@dataclasses.dataclass(frozen=True)
class VLLMSettings:
    """The kvactors keys of ``kv_connector_extra_config`` (see docs/vllm.md)."""

    cpu_bytes: int
    """Bytes of the CPU tier, all workers together (required, > 0)."""
    nvme_bytes: int = 0
    """Bytes of the NVMe tier, all workers together; 0: no NVMe tier."""
    nvme_directory: str | None = None
    """Where the NVMe tier's files go; ``None``: a temporary directory."""
    policy: str = "lru"
    """Eviction policy of the CPU tier."""
    nvme_policy: str | None = None
    """Eviction policy of the NVMe tier; ``None``: ``policy``."""
    write_mode: str = "back"
    """``"back"``: CPU victims are demoted to NVMe; ``"through"``: every store is
    written to NVMe as well as to CPU."""
    nvme_backend: str = "auto"
    """``"auto"``, ``"posix"`` or ``"kvikio"``."""
    nvme_stripes: int = 1
    """Files the NVMe tier's slots are striped over."""
    prefetch: bool = True
    """Lookups of blocks held only by NVMe start reading them into CPU
    (:mod:`kvactors.vllm.prefetch`); with an NVMe tier only."""
    remote_url: str | None = None
    """A Valkey / Redis server (``redis://host:port/db``): the remote tier, shared
    by every engine that names it (and the same model and layout)."""
    remote_nodes: tuple[str, ...] = ()
    """Cluster nodes (``host:port``) instead of ``remote_url``."""
    remote_username: str | None = None
    """The ACL user every connection to the server or each node logs in as
    (``None``: ``remote_url``'s, else ``default``)."""
    remote_password: str | None = None
    """The password every connection logs in with (``None``: ``remote_url``'s, if
    any); the only way to log in to ``remote_nodes``. Shown as ``***``."""
    remote_namespace: str = "kvactors"
    """First part of every server key."""
    remote_model: str | None = None
    """Model identity in the blocks' fingerprint; ``None``: vLLM's model name and dtype."""
    remote_timeout: float = 2.0
    """Seconds a server call may take before the server counts as down."""
    remote_ttl: float | None = None
    """Seconds the server keeps a block (``None``: until the server evicts it)."""

    def __repr__(self) -> str:
        # remote_url may carry a password: shown masked, as everywhere it is named.
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.remote_url is not None:
            shown["remote_url"] = masked_url(self.remote_url)
        if self.remote_password is not None:
            shown["remote_password"] = "***"
        return f"VLLMSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def remote(self) -> bool:
        return self.remote_url is not None or bool(self.remote_nodes)

    @property
    def resolved_nvme_policy(self) -> str:
        return self.nvme_policy or self.policy


def _int(
    extra: Mapping[str, Any],
    key: str,
    default: int | None,
    minimum: int,
    maximum: int | None = None,
) -> int:
    value = extra.get(key, default)
    if value is None and default is None:
        raise ConfigError(f"kv_connector_extra_config[{key!r}] is required (bytes, an int > 0)")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"kv_connector_extra_config[{key!r}]: expected an int, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(
            f"kv_connector_extra_config[{key!r}]: expected an int, got {value!r}"
        ) from None
    if number < minimum:
        raise ConfigError(f"kv_connector_extra_config[{key!r}]: must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"kv_connector_extra_config[{key!r}]: must be <= {maximum}, got {number}")
    return number


def _choice(extra: Mapping[str, Any], key: str, default: str | None, known: tuple[str, ...]) -> str:
    value = extra.get(key, default)
    if value not in known:
        raise ConfigError(
            f"kv_connector_extra_config[{key!r}]: {value!r} is not one of {', '.join(known)}"
        )
    return str(value)


def parse_settings(extra: Mapping[str, Any]) -> VLLMSettings:
    """The settings in ``extra`` (vLLM's ``kv_connector_extra_config``).

    Raises :class:`~kvactors.errors.ConfigError` naming the key for a missing,
    mistyped or out-of-range value and for an unknown key (a typo).
    """
    fields = {f.name for f in dataclasses.fields(VLLMSettings)}
    for key in extra:
        if key not in fields and key not in VLLM_KEYS:
            known = ", ".join(sorted(fields | VLLM_KEYS))
            raise ConfigError(f"kv_connector_extra_config[{key!r}]: unknown key; known: {known}")
    policies = tuple(sorted(POLICIES))
    directory = extra.get("nvme_directory")
    if directory is not None and (not isinstance(directory, str) or not directory):
        raise ConfigError(
            f"kv_connector_extra_config['nvme_directory']: expected a path, got {directory!r}"
        )
    problem = None if directory is None else path_problem(directory)
    if problem is not None:
        raise ConfigError(
            f"kv_connector_extra_config['nvme_directory']: {problem}, got {directory!r}"
        )
    nvme_policy = extra.get("nvme_policy")
    prefetch = extra.get("prefetch", True)
    if not isinstance(prefetch, bool):
        raise ConfigError(
            f"kv_connector_extra_config['prefetch']: expected true or false, got {prefetch!r}"
        )
    return VLLMSettings(
        **_remote(extra),
        cpu_bytes=_int(extra, "cpu_bytes", None, 1),
        nvme_bytes=_int(extra, "nvme_bytes", 0, 0),
        nvme_directory=directory,
        policy=_choice(extra, "policy", "lru", policies),
        nvme_policy=None if nvme_policy is None else _choice(extra, "nvme_policy", None, policies),
        write_mode=_choice(extra, "write_mode", "back", WRITE_MODES),
        nvme_backend=_choice(extra, "nvme_backend", "auto", ("auto", "posix", "kvikio")),
        nvme_stripes=_int(extra, "nvme_stripes", 1, 1, MAX_THREADS),
        prefetch=prefetch,
    )


def _positive(extra: Mapping[str, Any], key: str, default: float | None) -> float | None:
    """Seconds > 0 under ``key``; ``None`` only where that is the default (none)."""
    value = extra.get(key, default)
    if value is None and default is None:
        return None
    if not positive_seconds(value):
        raise ConfigError(
            f"kv_connector_extra_config[{key!r}]: expected seconds > 0, got {value!r}"
        )
    return float(value)


def _remote(extra: Mapping[str, Any]) -> dict[str, Any]:
    url = extra.get("remote_url")
    if url is not None and (not isinstance(url, str) or not url.startswith(REMOTE_SCHEMES)):
        raise ConfigError(
            f"kv_connector_extra_config['remote_url']: expected a redis://host:port URL, "
            f"got {masked_url(url) if isinstance(url, str) else url!r}"
        )
    nodes = extra.get("remote_nodes")
    nodes = () if nodes is None else nodes  # none, the default: no nodes
    if isinstance(nodes, str) or not isinstance(nodes, list | tuple):
        raise ConfigError(
            "kv_connector_extra_config['remote_nodes']: expected a list of host:port, "
            f"got {nodes!r}"
        )
    for node in nodes:
        try:
            if not isinstance(node, str):
                raise ConfigError(node)
            parse_node(node)
        except ConfigError:
            raise ConfigError(
                f"kv_connector_extra_config['remote_nodes']: expected host:port, got {node!r}"
            ) from None
    if url is not None and nodes:
        raise ConfigError(
            "kv_connector_extra_config['remote_nodes']: give remote_url or remote_nodes, not both"
        )
    namespace = extra.get("remote_namespace", "kvactors")
    if not namespace_ok(namespace):
        raise ConfigError(
            f"kv_connector_extra_config['remote_namespace']: expected a non-empty name without "
            f"'{{', '}}', ':', white space or control characters, got {namespace!r}"
        )
    model = extra.get("remote_model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ConfigError(
            f"kv_connector_extra_config['remote_model']: expected a name, got {model!r}"
        )
    if url is not None and not nodes:
        try:
            check_url(url)  # as [remote] url: a port, database path, query argument redis-py takes
        except ConfigError as exc:
            reason = str(exc).removeprefix("remote.url: ")
            raise ConfigError(f"kv_connector_extra_config['remote_url']: {reason}") from None
    timeout = _positive(extra, "remote_timeout", 2.0)
    assert timeout is not None
    login = {key: extra.get(key) for key in ("remote_username", "remote_password")}
    check_credentials(
        url,
        nodes,
        login["remote_username"],
        login["remote_password"],
        names=(
            "kv_connector_extra_config['remote_username']",
            "kv_connector_extra_config['remote_password']",
        ),
    )
    return {
        **login,
        "remote_url": url,
        "remote_nodes": tuple(nodes),
        "remote_namespace": namespace,
        "remote_model": model,
        "remote_timeout": timeout,
        "remote_ttl": _positive(extra, "remote_ttl", None),
    }


def nvme_io_backend(settings: VLLMSettings) -> str:
    """``"kvikio"`` or ``"posix"``: the NVMe I/O backend ``settings.nvme_backend`` gives
    on this host. ``"kvikio"`` where kvikio or the CUDA driver cannot load is a
    :class:`~kvactors.errors.ConfigError` naming ``nvme_backend``."""
    from kvactors.media.kvikio_io import resolve_nvme_backend

    try:
        return resolve_nvme_backend(settings.nvme_backend)
    except ConfigError:
        raise ConfigError(
            "kv_connector_extra_config['nvme_backend']: 'kvikio' asked for, but kvikio or "
            "the CUDA driver (libcuda.so.1) cannot be loaded here; use 'auto' or 'posix'"
        ) from None


def num_slots(total_bytes: int, row_bytes: int, world_size: int, key: str) -> int:
    """Slots a tier of ``total_bytes`` (all workers) has for rows of ``row_bytes`` per worker."""
    if row_bytes <= 0:
        return 0
    slots = total_bytes // (row_bytes * max(1, world_size))
    if total_bytes and slots == 0:
        raise ConfigError(
            f"kv_connector_extra_config[{key!r}]: {total_bytes} bytes hold no block of "
            f"{row_bytes} bytes x {max(1, world_size)} workers"
        )
    if slots > MAX_BLOCKS:
        raise ConfigError(
            f"kv_connector_extra_config[{key!r}]: {total_bytes} bytes make {slots} blocks of "
            f"{row_bytes} bytes x {max(1, world_size)} workers; a tier holds at most {MAX_BLOCKS}"
        )
    return slots
