"""The shape of a paged KV cache: ``KVCacheConfig``.

Sizes are derived, not given: ``kv_size_per_token`` is the bytes one token
takes across every layer (key and value), ``block_size_bytes`` the bytes of one
block of ``block_size`` tokens. One block gathered across all layers is what
travels to the offload tiers; ``offload_block_bytes`` (the offload store's
block size, ``kvactors.Config.block_bytes``) must be a whole number of those.

Every value is checked when the config is built; a wrong one raises
:class:`~kvactors.errors.ConfigError` whose message names the field.
"""

from __future__ import annotations

import math
from fractions import Fraction

import msgspec
import torch

from kvactors.config import DEVICE_NAMES, is_device_name
from kvactors.errors import ConfigError
from kvactors.media.memory import resolve_device

__all__ = ["DTYPES", "KVCacheConfig"]

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
"""The KV dtypes the paged cache supports, by name."""


def _check_int(value: object, name: str, minimum: int) -> None:
    if type(value) is not int or value < minimum:
        raise ConfigError(f"{name}: expected an int >= {minimum}, got {value!r}")


class KVCacheConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The engine-side paged KV cache.

    - ``num_layers``, ``num_kv_heads``, ``head_dim``, ``dtype``: the model's KV
      layout; ``dtype`` is a name from :data:`DTYPES` (``"float16"``, ...).
    - ``block_size``: tokens per block. ``num_gpu_blocks``: blocks in the pool.
    - ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when
      available, else the CPU; same code either way).
    - ``offload_block_bytes``: bytes of one offload block; ``None`` means one
      paged block (``block_size_bytes``). A larger value packs
      ``blocks_per_offload`` consecutive blocks of a sequence into one offload
      block under one key.
    - ``watermark``: fraction of the pool under which the cache is under memory
      pressure (fewer empty or already-offloaded blocks than that): pressure
      callbacks run and idle cached blocks are offloaded ahead of their reuse.
    - ``namespace``: mixed into every block hash, so two models sharing one
      offload store never share keys (use the model's name and revision).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_gpu_blocks: int
    dtype: str = "float16"
    block_size: int = 16
    device: str = "cpu"
    offload_block_bytes: int | None = None
    watermark: float = 0.1
    namespace: str = ""

    def __post_init__(self) -> None:
        _check_int(self.num_layers, "num_layers", 1)
        _check_int(self.num_kv_heads, "num_kv_heads", 1)
        _check_int(self.head_dim, "head_dim", 1)
        _check_int(self.num_gpu_blocks, "num_gpu_blocks", 1)
        _check_int(self.block_size, "block_size", 1)
        if self.dtype not in DTYPES:
            known = ", ".join(DTYPES)
            raise ConfigError(f"dtype: unsupported KV dtype {self.dtype!r}; supported: {known}")
        if not is_device_name(self.device):
            raise ConfigError(f"device: expected {DEVICE_NAMES}, got {self.device!r}")
        if self.offload_block_bytes is not None:
            _check_int(self.offload_block_bytes, "offload_block_bytes", 1)
            if self.offload_block_bytes % self.block_size_bytes:
                raise ConfigError(
                    f"block_size: a block of {self.block_size} tokens takes "
                    f"{self.block_size_bytes} bytes, which does not divide "
                    f"offload_block_bytes={self.offload_block_bytes}"
                )
        if (
            type(self.watermark) not in (int, float)
            or not math.isfinite(self.watermark)
            or not 0 <= self.watermark < 1
        ):
            raise ConfigError(
                f"watermark: expected an int or a float in [0, 1), got {self.watermark!r}"
            )
        if not isinstance(self.namespace, str):
            raise ConfigError(f"namespace: expected a str, got {type(self.namespace).__name__}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_size_per_token(self) -> int:
        """Bytes one token's keys and values take across all layers."""
        itemsize = self.torch_dtype.itemsize
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    @property
    def block_size_bytes(self) -> int:
        """Bytes of one block gathered across all layers (one offload row)."""
        return self.block_size * self.kv_size_per_token

    @property
    def blocks_per_offload(self) -> int:
        """Consecutive blocks of a sequence packed into one offload block."""
        if self.offload_block_bytes is None:
            return 1
        return self.offload_block_bytes // self.block_size_bytes

    @property
    def offload_bytes(self) -> int:
        """Bytes of one offload block (``offload_block_bytes`` resolved)."""
        return self.blocks_per_offload * self.block_size_bytes

    @property
    def watermark_blocks(self) -> int:
        """``watermark`` as a block count, rounded up, from the decimal value written.

        Exact: ``0.07`` of 100 blocks is 7 (the float product, 7.000000000000001,
        would round up to 8).
        """
        return math.ceil(Fraction(repr(self.watermark)) * self.num_gpu_blocks)

    def resolved_device(self) -> torch.device:
        """``device`` with ``"auto"`` resolved to CUDA when available, else the CPU.

        Raises :class:`~kvactors.errors.ConfigError` for ``"cuda"`` / ``"cuda:N"``
        when CUDA is not available, or when device ``N`` does not exist.
        """
        return resolve_device(self.device, "device")
