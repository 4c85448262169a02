"""docs/vllm.md's configuration table held to ``kvactors.vllm`` (no vLLM needed):
every kvactors key of ``kv_connector_extra_config`` is documented with the
default the code applies, a bad value raises ConfigError naming the key, and
vLLM's own keys pass through."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from _docs import DOCS, code, doc_table, toml_value
from kvactors.errors import ConfigError
from kvactors.vllm import extra_config
from kvactors.vllm.config import (
    VLLM_KEYS,
    VLLMSettings,
    num_slots,
    nvme_io_backend,
    parse_settings,
)
from kvactors.vllm.tiers import COUNTERS, TieredManager

VLLM_MD = DOCS / "vllm.md"
# Defaults the table gives in words, not as a literal.
IN_WORDS = {
    "required": None,
    "a temporary directory": None,
    "`policy`": None,  # resolved to the CPU tier's policy
    "vLLM's model name and dtype": None,  # filled in by the spec from vLLM's config
}


def table() -> dict[str, str]:
    rows = doc_table(VLLM_MD, "| key | default | meaning |")
    return {code(row[0]): row[1] for row in rows}


def test_every_key_is_documented_with_its_default() -> None:
    documented = table()
    fields = {f.name for f in dataclasses.fields(VLLMSettings)}
    assert set(documented) - {"spec_module_path", "spec_name"} == fields
    settings = parse_settings({"cpu_bytes": 1})
    for key, cell in documented.items():
        if key in ("spec_module_path", "spec_name", "cpu_bytes"):
            continue
        want = IN_WORDS[cell] if cell in IN_WORDS else toml_value(cell)
        got = getattr(settings, key)
        assert (list(got) if isinstance(got, tuple) else got) == (
            [] if want is None and key == "remote_nodes" else want
        ), key
    assert settings.resolved_nvme_policy == settings.policy
    with pytest.raises(ConfigError, match=r"'cpu_bytes'.*required"):
        parse_settings({})


def test_spec_module_and_name_are_what_extra_config_adds() -> None:
    meaning = {code(row[0]): row[2] for row in doc_table(VLLM_MD, "| key | default | meaning |")}
    config = extra_config(cpu_bytes=1)
    assert config["spec_module_path"] == toml_value(meaning["spec_module_path"])
    assert config["spec_name"] == toml_value(meaning["spec_name"])


BAD = [
    ("cpu_bytes", 0), ("cpu_bytes", -1), ("cpu_bytes", "lots"), ("cpu_bytes", True),
    ("nvme_bytes", -1), ("nvme_bytes", 1.5), ("nvme_directory", ""), ("nvme_directory", 3),
    ("policy", "fifo"), ("nvme_policy", "fifo"), ("write_mode", "around"),
    ("nvme_backend", "gds"), ("nvme_stripes", 0), ("prefetch", "yes"),
    ("remote_url", "127.0.0.1:6379"), ("remote_url", 5), ("remote_nodes", "h:1"),
    ("remote_nodes", ["no-port"]), ("remote_namespace", "a:b"), ("remote_namespace", ""),
    ("remote_namespace", "a\tb"), ("remote_namespace", "a\x7fb"),
    ("remote_model", ""), ("remote_timeout", 0), ("remote_timeout", "2"), ("remote_ttl", -1),
    ("nvme_stripes", 1025), ("remote_url", "http://127.0.0.1:6379"),
    ("remote_timeout", float("nan")), ("remote_timeout", float("inf")),
    ("remote_ttl", float("nan")), ("remote_nodes", ["h:0"]), ("remote_nodes", ["h:65536"]),
    ("remote_nodes", [7000]), ("remote_nodes", ["h:\u00b2"]), ("remote_ttl", 0),
    ("remote_ttl", "5"), ("remote_ttl", True), ("remote_ttl", float("inf")),
    ("remote_timeout", None), ("nvme_stripes", None), ("remote_nodes", ""), ("remote_nodes", {}),
    ("remote_timeout", 2**1100), ("remote_ttl", 2**1100), ("remote_nodes", [":7000"]),
    ("remote_username", ""), ("remote_username", 5), ("remote_password", ""),
    ("remote_password", ["pw"]), ("nvme_directory", "/tmp/kv\x00"),
    ("nvme_directory", "kv\ud800"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), BAD)
def test_a_bad_value_is_a_config_error_naming_its_key(key: str, value: Any) -> None:
    """ "`extra_config(...)` checks the settings at once and raises `ConfigError`
    naming a bad key"."""
    settings = {"cpu_bytes": 1 << 20, key: value}
    with pytest.raises(ConfigError, match=f"'{key}'"):
        extra_config(**settings)


def test_a_key_whose_default_is_none_takes_none() -> None:
    """The table's defaults written out: `none` is accepted where it is the default."""
    settings = parse_settings(
        extra_config(
            cpu_bytes=1, nvme_directory=None, nvme_policy=None, remote_url=None,
            remote_nodes=None, remote_model=None, remote_ttl=None,
        )
    )  # fmt: skip
    assert settings == parse_settings({"cpu_bytes": 1})
    assert not settings.remote
    with pytest.raises(ConfigError, match=r"'nvme_bytes'.*expected an int, got None"):
        extra_config(cpu_bytes=1, nvme_bytes=None)


def test_remote_url_and_remote_nodes_are_one_or_the_other() -> None:
    """`remote_nodes`: "a list of cluster nodes instead of `remote_url`"."""
    with pytest.raises(ConfigError, match=r"'remote_nodes'.*not both"):
        extra_config(cpu_bytes=1, remote_url="redis://h:1/0", remote_nodes=["h:7000"])
    cluster = parse_settings(extra_config(cpu_bytes=1, remote_nodes=["h:7000", "[::1]:7001"]))
    assert cluster.remote
    assert cluster.remote_url is None
    assert cluster.remote_nodes == ("h:7000", "[::1]:7001")
    for url in ("redis://h:1/0", "rediss://h:1/0", "unix:///tmp/valkey.sock"):
        assert parse_settings(extra_config(cpu_bytes=1, remote_url=url)).remote
    assert not parse_settings(extra_config(cpu_bytes=1)).remote


def test_a_numeric_string_is_accepted_for_bytes_and_a_typo_is_an_error() -> None:
    assert parse_settings(extra_config(cpu_bytes="4096")).cpu_bytes == 4096
    with pytest.raises(ConfigError, match=r"'cpu_byte'.*unknown key"):
        extra_config(cpu_byte=1)


def test_vllms_own_keys_pass_through() -> None:
    """ "vLLM's own keys of the same dict pass through to vLLM: blocks_per_chunk (or
    block_size ...), offload_prompt_only, self_describing_kv_events, canonical_layout"."""
    named = {"blocks_per_chunk", "block_size", "offload_prompt_only",
             "self_describing_kv_events", "canonical_layout"}  # fmt: skip
    assert named | {"spec_module_path", "spec_name"} == VLLM_KEYS
    config = extra_config(
        cpu_bytes=1,
        blocks_per_chunk=2,
        block_size=32,
        offload_prompt_only=False,
        self_describing_kv_events=True,
        canonical_layout=True,
    )
    assert config["blocks_per_chunk"] == 2


def test_a_tier_size_too_small_or_too_large_is_a_config_error_naming_its_key() -> None:
    """ "A tier size too small for one block raises ConfigError naming its key"; one of
    more slots than a tier holds (2**31 - 1) names it too."""
    assert num_slots(8 << 20, 1 << 20, 2, "cpu_bytes") == 4
    with pytest.raises(ConfigError, match=r"'cpu_bytes'.*hold no block"):
        num_slots(1 << 20, 1 << 20, 2, "cpu_bytes")
    with pytest.raises(ConfigError, match=r"'nvme_bytes'.*at most 2147483647"):
        num_slots(2**31 * 4096, 4096, 1, "nvme_bytes")
    assert num_slots((2**31 - 1) * 4096, 4096, 1, "nvme_bytes") == 2**31 - 1


def test_the_metrics_table_is_the_counters_and_gauges_the_backend_reports() -> None:
    """'Metrics': every counter the scheduler's tiers count is a row (kind
    counter), and the gauges are the tiers' usage, NVMe's only with an NVMe
    tier, each a fraction of the slots in use."""
    rows = doc_table(VLLM_MD, "| metric | kind | what |")
    kinds = {code(row[0]): row[1] for row in rows}
    prefix = "vllm:kvactors_"
    assert all(name.startswith(prefix) for name in kinds)
    counters = {n.removeprefix(prefix) for n, kind in kinds.items() if kind == "counter"}
    gauges = {n.removeprefix(prefix) for n, kind in kinds.items() if kind == "gauge"}
    assert counters == set(COUNTERS)
    assert len(counters) == len(COUNTERS)
    assert gauges == {"cpu_usage", "nvme_usage"}
    assert set(kinds.values()) == {"counter", "gauge"}
    cpu_only = TieredManager(4)
    assert set(cpu_only.usage()) == {"cpu"}
    tiers = TieredManager(4, 8)
    out = tiers.prepare_store([b"a", b"b"])
    assert out is not None
    tiers.complete_store(out[0])
    assert tiers.usage() == {"cpu": 0.5, "nvme": 0.0}
    assert tiers.take_counters()["store_blocks"] == 2


def test_kvikio_where_it_cannot_load_is_a_config_error_naming_nvme_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ "`"kvikio"` (GPUDirect Storage; `ConfigError` at engine start where kvikio or
    the CUDA driver cannot load) or `"auto"` (kvikio where it loads, POSIX otherwise)"."""
    monkeypatch.setattr("kvactors.media.kvikio_io.kvikio_available", lambda: False)
    kvikio = parse_settings(extra_config(cpu_bytes=1, nvme_bytes=1, nvme_backend="kvikio"))
    with pytest.raises(ConfigError, match=r"kv_connector_extra_config\['nvme_backend'\]"):
        nvme_io_backend(kvikio)
    for name in ("auto", "posix"):
        settings = parse_settings(extra_config(cpu_bytes=1, nvme_bytes=1, nvme_backend=name))
        assert nvme_io_backend(settings) == "posix"
    monkeypatch.setattr("kvactors.media.kvikio_io.kvikio_available", lambda: True)
    assert nvme_io_backend(kvikio) == "kvikio"
    assert nvme_io_backend(parse_settings({"cpu_bytes": 1})) == "kvikio"  # auto
