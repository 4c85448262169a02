"""The baseline ``bench paged`` and ``bench vllm`` hold a round trip to: the same
bytes copied out of device memory into host memory and back, contiguous."""

from __future__ import annotations

import time

import torch

__all__ = ["HostRoundTrip", "sync"]


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued copies (nothing to wait for on the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostRoundTrip:
    """``nbytes`` in ``device`` memory, a host buffer as large (pinned where the
    device is CUDA) and a second device buffer to copy them back into."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.device = device
        self.src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.dst = torch.empty_like(self.src)
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")

    def __call__(self) -> float:
        """Seconds of one copy out to the host buffer and back, queued copies
        waited for before and after."""
        sync(self.device)
        start = time.perf_counter()
        self.host.copy_(self.src)
        self.dst.copy_(self.host)
        sync(self.device)
        return time.perf_counter() - start
