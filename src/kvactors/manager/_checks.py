"""Checks both cores make the same way: constructor arguments and the policy choice."""

from __future__ import annotations

from kvactors.errors import ConfigError, UnknownPolicyError
from kvactors.manager._types import MAX_BLOCKS
from kvactors.policy import POLICIES
from kvactors.policy._base import CachePolicy

try:
    from kvactors import _manager_core
except ImportError:  # built without a C compiler: the Python manager does it all
    _manager_core = None  # type: ignore[assignment]

__all__ = ["NATIVE", "NATIVE_POLICIES", "check_sizes", "resolve_policy", "use_native"]

MAX_BLOCK_SIZE = 2**63 - 1
"""The largest ``block_size`` (tokens per block): the compiled core holds it in a C ``ssize_t``."""

NATIVE: bool = _manager_core is not None
"""Whether the compiled core was built (see :class:`OffloadingManager`'s ``native``)."""

NATIVE_POLICIES: tuple[str, ...] = _manager_core.POLICIES if _manager_core is not None else ()
"""The built-in policies with a table entry of their own in the compiled core;
any other policy (a name of :data:`kvactors.policy.POLICIES` or a
:class:`~kvactors.policy.CachePolicy` object) runs on it through the entry that
calls back into the Python object."""


def check_sizes(num_blocks: object, block_size: object, medium: object = "CPU") -> None:
    """The same :class:`~kvactors.errors.ConfigError`, naming the field, on both cores."""
    if type(num_blocks) is not int or not 0 < num_blocks <= MAX_BLOCKS:
        raise ConfigError(f"num_blocks must be an int in 1..{MAX_BLOCKS}, got {num_blocks!r}")
    if type(block_size) is not int or not 0 < block_size <= MAX_BLOCK_SIZE:
        raise ConfigError(f"block_size must be a positive int up to 2**63 - 1, got {block_size!r}")
    if not isinstance(medium, str):
        raise ConfigError(f"medium must be a str, got {type(medium).__name__}")


def resolve_policy(policy: object) -> str | CachePolicy:
    """``policy`` checked: a known name, or an object implementing ``CachePolicy``.

    Raises :class:`~kvactors.errors.UnknownPolicyError` (a ``ConfigError``)
    for anything else, on both cores, before any state is made.
    """
    if isinstance(policy, str):
        if policy not in POLICIES:
            known = ", ".join(sorted(POLICIES))
            raise UnknownPolicyError(f"unknown policy {policy!r}; supported: {known}")
        return policy
    if isinstance(policy, CachePolicy):
        return policy
    known = ", ".join(sorted(POLICIES))
    raise UnknownPolicyError(
        f"policy must be a policy name ({known}) or a CachePolicy object, "
        f"got {type(policy).__name__}"
    )


def use_native(native: object) -> bool:
    """Whether a manager runs on the compiled core: ``None`` when built, ``True``
    demands it (:class:`~kvactors.errors.ConfigError` when it is not built)."""
    if native is None:
        return NATIVE
    if type(native) is not bool:
        raise ConfigError(f"native must be True, False or None, got {native!r}")
    if native and not NATIVE:
        raise ConfigError("native=True: the compiled core (kvactors._manager_core) is not built")
    return native
