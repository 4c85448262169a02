"""Bad values given to ``kvactors bench ...``: exit status 2 with the error on
stderr's last line, no traceback, nothing on stdout."""

from __future__ import annotations

import json

import pytest
import torch

from kvactors.cli import main
from kvactors.cli.bench import paged as bench_paged
from kvactors.errors import ConfigError
from kvactors.media import resolve_device
from kvactors.paged import KVCacheConfig


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``kvactors ARGV``; assert it is refused as a usage error would be;
    return stderr's last line."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error:" in last
    return last


@pytest.mark.parametrize("device", ["cuda", "cuda:0"], ids=["first-gpu", "gpu-0"])
def test_bench_paged_on_cuda_without_cuda_is_a_config_error(
    device: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def measured(*_: object) -> None:
        pytest.fail("the allocator was measured before the device was refused")

    monkeypatch.setattr(bench_paged, "_workload", measured)
    last = refused(["bench", "paged", "--device", device], capsys)
    assert last == f"kvactors: error: device: {device!r} asked for, but CUDA is not available"


def test_paged_config_resolves_a_missing_cuda_device_to_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def config(device: str) -> KVCacheConfig:
        return KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, num_gpu_blocks=4,
                             device=device)  # fmt: skip

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config("cpu").resolved_device() == torch.device("cpu")
    assert config("auto").resolved_device() == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        config("cuda").resolved_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert config("cuda:1").resolved_device() == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="'cuda:2' asked for, but CUDA has 2 devices"):
        config("cuda:2").resolved_device()


@pytest.mark.parametrize("value", ["65536", "100000"])
def test_bench_nvme_index_refuses_keys_longer_than_the_index_records(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    last = refused(["bench", "nvme-index", "--blocks", "10", "--key-bytes", value], capsys)
    assert last.endswith(f"error: argument --key-bytes: must be at most 65,535, got {value}")


def test_bench_nvme_index_runs_with_the_longest_key(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "nvme-index", "--blocks", "8", "--key-bytes", "65535", "--rounds", "1",
            "--durable-seconds", "0.01", "--json"]  # fmt: skip
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["summary"]["results"]["key_bytes"] == 65535


def test_a_cache_on_a_cuda_device_past_the_count_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(
        ConfigError, match=r"^gpu.device: 'cuda:1' asked for, but CUDA has 1 devices"
    ):
        resolve_device("cuda:1")
