"""What a caller of :class:`~kvactors.cache.handle.KVCache` may pass, checked.

Keys: a non-empty list or tuple of valid keys
(:func:`~kvactors.keys.check_keys`). A source or destination: a list (tuple,
range) of distinct GPU-pool slot ids in range, one per key, or a dense,
contiguous CPU / CUDA tensor of ``n`` blocks (``n * block_bytes`` bytes, first
dimension ``n``), viewed as ``(n, block_bytes)`` bytes; ``None`` with
``move_bytes=False``. Anything else raises a typed error
(:class:`~kvactors.errors.InvalidKeyError`,
:class:`~kvactors.errors.TensorSpecError`) naming the call, before any message
is sent.
"""

from __future__ import annotations

from typing import Any

import torch

from kvactors.errors import InvalidKeyError, TensorSpecError
from kvactors.keys import Key, check_keys, distinct_slots
from kvactors.media.memory import slot_ints

__all__ = ["check_key_list", "check_side"]


def check_key_list(keys: object, what: str) -> list[Key]:
    """``keys`` as a list, checked (``what`` names the call in the error)."""
    if type(keys) is not list:
        if not isinstance(keys, (list, tuple)):
            kind = type(keys).__name__
            raise InvalidKeyError(f"{what}: keys must be a list or tuple of keys, got {kind}")
        keys = list(keys)
    if not keys:
        raise InvalidKeyError(f"{what}: no keys given")
    check_keys(keys, what)
    return keys


def _slot_ids(side: object, what: str) -> list[int]:
    """The ints of a list / tuple / range of integers (numpy and torch integers
    included); anything else (floats, strings, sets, bools) is refused."""
    if not isinstance(side, (list, tuple, range)):
        kind = type(side).__name__
        raise TensorSpecError(
            f"{what}: expected a tensor or a list of GPU-pool slot ids, got {kind}"
        )
    return slot_ints(side, what)


def check_side(
    block_bytes: int, gpu_blocks: int, move_bytes: bool, side: Any, n: int, what: str
) -> Any:
    """The source or destination of a call for ``n`` keys (of a cache of
    ``block_bytes`` blocks, ``gpu_blocks`` GPU-pool slots), checked: a copy of
    its slot id list, its tensor viewed as ``(n, block_bytes)`` bytes, or
    ``None`` (``move_bytes=False``)."""
    if not move_bytes:
        if side is not None:
            raise TensorSpecError(f"{what}: must be None with move_bytes=False")
        return None
    bb = block_bytes
    if isinstance(side, torch.Tensor):
        if side.layout != torch.strided:
            raise TensorSpecError(f"{what}: tensor must be dense (strided), got {side.layout}")
        if side.requires_grad and what.startswith("load"):
            raise TensorSpecError(f"{what}: tensor requires grad; pass a detached tensor")
        if side.device.type not in ("cpu", "cuda"):
            raise TensorSpecError(
                f"{what}: tensor must be on the CPU or a CUDA device, got {side.device}"
            )
        if side.dim() == 0 or side.shape[0] != n:
            raise TensorSpecError(
                f"{what}: tensor must have {n} blocks in its first dimension, "
                f"got shape {tuple(side.shape)}"
            )
        if side.nbytes != n * bb:
            raise TensorSpecError(f"{what}: tensor holds {side.nbytes} bytes, expected {n} x {bb}")
        if not side.is_contiguous():
            raise TensorSpecError(f"{what}: tensor must be contiguous")
        if side.is_conj() or side.is_neg():
            # A lazy view (x.conj(), torch's negative bit): its memory does not
            # hold the values it shows, so its bytes are not the blocks.
            kind, fix = (
                ("conjugate", "resolve_conj") if side.is_conj() else ("negative", "resolve_neg")
            )
            raise TensorSpecError(
                f"{what}: tensor is a lazy {kind} view; pass x.{fix}() (memory holding its values)"
            )
        return side.view(torch.uint8).view(n, bb) if side.dtype != torch.uint8 else side.view(n, bb)
    limit = gpu_blocks
    if distinct_slots(side, limit) and len(side) == n:
        return side.copy()  # the common case; anything else gets the checks below
    ids = _slot_ids(side, what)
    if len(ids) != n:
        raise TensorSpecError(f"{what}: {len(ids)} slot ids for {n} keys")
    if ids and (min(ids) < 0 or max(ids) >= limit):
        bad = next(i for i in ids if not 0 <= i < limit)
        raise TensorSpecError(f"{what}: GPU-pool slot {bad} is out of range 0..{limit - 1}")
    if len(set(ids)) != len(ids):
        raise TensorSpecError(f"{what}: a GPU-pool slot id is named twice")
    return ids
