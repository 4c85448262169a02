"""kvactors as vLLM's KV offloading backend (vLLM >= 0.32).

Enable it in vLLM with::

    KVTransferConfig(
        kv_connector="OffloadingConnector",
        kv_role="kv_both",
        kv_connector_extra_config={
            "spec_module_path": "kvactors.vllm",
            "spec_name": "KVActorsOffloadingSpec",
            "cpu_bytes": 8 << 30,
            "nvme_bytes": 64 << 30,
            "nvme_directory": "/mnt/nvme/kv",
        },
    )

The vLLM classes (:class:`KVActorsOffloadingSpec` and the manager and worker it
makes) import vLLM and load on first use; :mod:`kvactors.vllm.config`,
:mod:`kvactors.vllm.tiers`, :mod:`kvactors.vllm.mover` and
:mod:`kvactors.vllm.paged_rows` do not need it.
See docs/vllm.md.
"""

from __future__ import annotations

from typing import Any

from kvactors.vllm.config import SPEC_MODULE, SPEC_NAME, VLLMSettings, parse_settings

__all__ = [
    "SPEC_MODULE",
    "SPEC_NAME",
    "KVActorsLoadStoreSpec",
    "KVActorsManager",
    "KVActorsOffloadingSpec",
    "KVActorsWorker",
    "VLLMSettings",
    "extra_config",
    "parse_settings",
]

_VLLM_CLASSES = (
    "KVActorsLoadStoreSpec",
    "KVActorsManager",
    "KVActorsOffloadingSpec",
    "KVActorsWorker",
)


def extra_config(**settings: Any) -> dict[str, Any]:
    """A ``kv_connector_extra_config`` selecting kvactors, with ``settings`` (checked)."""
    config = {"spec_module_path": SPEC_MODULE, "spec_name": SPEC_NAME, **settings}
    parse_settings(config)
    return config


def __getattr__(name: str) -> Any:
    if name in _VLLM_CLASSES:
        from kvactors.vllm import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'kvactors.vllm' has no attribute {name!r}")
