"""Shared test configuration: the anyio backend, and clean skips for CUDA / GDS tests."""

from __future__ import annotations

import pytest
import torch

from kvactors.media import kvikio_available


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    no_gds = pytest.mark.skip(reason="needs kvikio with a loadable CUDA driver")
    has_cuda = torch.cuda.is_available()
    has_gds: bool | None = None
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(no_cuda)
        if "gds" in item.keywords:
            if has_gds is None:
                has_gds = kvikio_available()
            if not has_gds:
                item.add_marker(no_gds)
