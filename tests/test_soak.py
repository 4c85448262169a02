"""A short soak: concurrent clients, injected faults, every invariant checked at the end."""

from __future__ import annotations

import anyio
import pytest

from kvactors.cli.soak import run_soak

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("seed", [1, 2])
async def test_soak_with_faults_loses_nothing(seed: int) -> None:
    with anyio.fail_after(60):
        res = await run_soak(
            seconds=2.0, clients=6, keys=240, seed=seed, p_write_fault=0.05, p_read_fault=0.05
        )
    assert res.faults_injected > 0
    assert res.blocks_verified > 0
    assert res.wrong_bytes == 0
    assert res.lost == 0
    assert res.invariants_ok
    assert res.events_dropped == 0
