"""KV tensors: the attention layout, and block moves to and from offload rows."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvactors.errors import ConfigError, PagedCacheError, TensorSpecError
from kvactors.paged import DTYPES, KVCacheConfig, KVTensors


def config(**changes: Any) -> KVCacheConfig:
    base: dict[str, Any] = {
        "num_layers": 3,
        "num_kv_heads": 2,
        "head_dim": 4,
        "num_gpu_blocks": 6,
        "block_size": 2,
        "dtype": "float32",
    }
    return KVCacheConfig(**{**base, **changes})


def numbered(c: KVCacheConfig) -> KVTensors:
    """Every element a distinct number: layer * 10000 + its flat index."""
    kv = KVTensors(c)
    for i, t in enumerate(kv.layers):
        t.copy_(torch.arange(t.numel()).view(t.shape).to(c.torch_dtype) + 10000 * i)
    return kv


def test_layers_have_the_attention_layout() -> None:
    kv = KVTensors(config())
    assert len(kv.layers) == 3
    assert all(t.shape == (2, 6, 2, 2, 4) and t.dtype == torch.float32 for t in kv.layers)
    assert kv.key_cache(1).data_ptr() == kv.layers[1][0].data_ptr()
    assert kv.value_cache(1).shape == (6, 2, 2, 4)
    assert kv.device == torch.device("cpu")


def test_a_row_is_one_block_across_all_layers_keys_then_values() -> None:
    c = config()
    kv = numbered(c)
    rows = kv.gather([4, 1])
    assert rows.shape == (2, c.block_size_bytes)
    assert rows.dtype == torch.uint8
    for i, block in enumerate([4, 1]):
        expected = torch.cat([t[:, block].reshape(-1) for t in kv.layers])  # [layer][k|v]
        assert torch.equal(rows[i].view(torch.float32), expected)


def test_scatter_writes_rows_back_and_touches_nothing_else() -> None:
    kv = numbered(config())
    before = [t.clone() for t in kv.layers]
    rows = kv.gather([0, 1])
    kv.scatter([5, 3], rows)
    for t, old in zip(kv.layers, before, strict=True):
        assert torch.equal(t[:, 5], old[:, 0])
        assert torch.equal(t[:, 3], old[:, 1])
        for b in (0, 1, 2, 4):
            assert torch.equal(t[:, b], old[:, b])


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_dtype_moves_bit_for_bit(dtype: str) -> None:
    c = config(dtype=dtype)
    kv = KVTensors(c)
    g = torch.Generator().manual_seed(0)
    for t in kv.layers:
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, generator=g))
    out = torch.zeros((3, c.block_size_bytes), dtype=torch.uint8)
    assert kv.gather([2, 0, 5], out=out) is out
    raw = [t.view(torch.uint8).clone() for t in kv.layers]
    kv.scatter([3, 1, 4], out)
    for t, old in zip(kv.layers, raw, strict=True):
        now = t.view(torch.uint8)
        assert torch.equal(now[:, [3, 1, 4]], old[:, [2, 0, 5]])
        assert torch.equal(now[:, [0, 2, 5]], old[:, [0, 2, 5]])


def test_copy_blocks_reads_every_source_before_writing() -> None:
    kv = numbered(config())
    before = [t.clone() for t in kv.layers]
    kv.copy_blocks([0, 1, 2], [1, 2, 0])  # a rotation
    for t, old in zip(kv.layers, before, strict=True):
        assert torch.equal(t[:, [1, 2, 0]], old[:, [0, 1, 2]])
    kv.copy_blocks([], [])


def test_rows_may_be_any_contiguous_tensor_of_the_right_size() -> None:
    c = config()
    kv = numbered(c)
    as_floats = kv.gather([1]).view(torch.float32)  # (1, block_size_bytes / 4)
    kv.scatter([2], as_floats)
    assert all(torch.equal(t[:, 2], t[:, 1]) for t in kv.layers)


def test_bad_moves_are_refused() -> None:
    c = config()
    kv = KVTensors(c)
    with pytest.raises(PagedCacheError, match=r"gather: block id 6 is out of range 0\.\.5"):
        kv.gather([1, 6])
    with pytest.raises(PagedCacheError, match="scatter: a destination block id is named twice"):
        kv.scatter([1, 1], kv.gather([0, 0]))
    with pytest.raises(TensorSpecError, match="scatter rows: expected 2 rows"):
        kv.scatter([1, 2], kv.gather([0]))
    transposed = torch.zeros((c.block_size_bytes, 2), dtype=torch.uint8).t()
    with pytest.raises(TensorSpecError, match="scatter rows: rows must be contiguous"):
        kv.scatter([1, 2], transposed)
    with pytest.raises(PagedCacheError, match="copy_blocks: 2 sources for 1 destinations"):
        kv.copy_blocks([0, 1], [2])


def test_tensors_an_engine_owns_are_checked() -> None:
    c = config()
    good = [torch.zeros((2, 6, 2, 2, 4)) for _ in range(3)]
    kv = KVTensors(c, good)
    assert kv.layers[0] is good[0]
    kv.layers[0][0, 3] = 7.0
    assert torch.equal(kv.gather([3])[0, :4].view(torch.float32), torch.tensor([7.0]))
    with pytest.raises(TensorSpecError, match="layers: expected 3 tensors, got 2"):
        KVTensors(c, good[:2])
    with pytest.raises(TensorSpecError, match=r"layers\[1\]: expected shape"):
        KVTensors(c, [good[0], torch.zeros((2, 5, 2, 2, 4)), good[2]])
    with pytest.raises(TensorSpecError, match=r"layers\[2\]: expected dtype float32"):
        KVTensors(c, [good[0], good[1], good[2].half()])


def test_rows_at_an_odd_address_move_byte_by_byte_just_as_well() -> None:
    c = config()
    kv = numbered(c)
    buffer = torch.zeros(2 * c.block_size_bytes + 1, dtype=torch.uint8)
    rows = buffer[1:].view(2, c.block_size_bytes)  # not aligned to a word
    kv.gather([4, 1], out=rows)
    assert torch.equal(rows, kv.gather([4, 1]))
    kv.scatter([0, 2], rows)
    assert all(torch.equal(t[:, [0, 2]], t[:, [4, 1]]) for t in kv.layers)


def test_what_is_not_a_config_a_tensor_or_a_list_of_tensors_is_refused_by_name() -> None:
    """These raised AttributeError or TypeError from inside KVTensors; now the
    typed error that names the argument (ConfigError for the config, as
    PagedKVCache gives, TensorSpecError for the tensors)."""
    import numpy as np

    c = config()
    with pytest.raises(ConfigError, match=r"^config: expected a KVCacheConfig, got str$"):
        KVTensors("c")  # type: ignore[arg-type]
    with pytest.raises(
        TensorSpecError, match=r"^layers: expected a sequence of 3 tensors, got int$"
    ):
        KVTensors(c, 5)  # type: ignore[arg-type]
    layer = np.zeros((2, 6, 2, 2, 4), np.float32)
    with pytest.raises(
        TensorSpecError, match=r"^layers\[0\]: expected a torch.Tensor, got ndarray$"
    ):
        KVTensors(c, [layer] * 3)  # type: ignore[list-item]
    kv = KVTensors(c)
    with pytest.raises(
        TensorSpecError, match=r"^scatter rows: expected a torch.Tensor, got NoneType$"
    ):
        kv.scatter([1], None)  # type: ignore[arg-type]
    with pytest.raises(TensorSpecError, match=r"^gather out: expected a torch.Tensor, got list$"):
        kv.gather([1], out=[0] * c.block_size_bytes)  # type: ignore[arg-type]
    # Any iterable of the right tensors still is one: a generator, a stacked tensor.
    stacked = torch.zeros((3, 2, 6, 2, 2, 4))
    assert KVTensors(c, stacked).layers[2].data_ptr() == stacked[2].data_ptr()
    assert len(KVTensors(c, (t for t in torch.zeros((3, 2, 6, 2, 2, 4)))).layers) == 3


def test_block_ids_may_be_numpy_or_torch_integers_and_nothing_else() -> None:
    """A block table kept as a numpy array or a tensor (as engines keep them) moves
    the same rows as a list; its ids used to be refused as 'block id tensor(1) is
    out of range 0..5', naming an id that is in range. A bool or a float is not a
    block id, and the message says so."""
    import numpy as np

    c = config()
    kv = numbered(c)
    want = kv.gather([4, 1, 2])
    for ids in (np.array([4, 1, 2]), torch.tensor([4, 1, 2]), [np.int64(4), 1, torch.tensor(2)]):
        assert torch.equal(kv.gather(ids), want)  # type: ignore[arg-type]
    other = numbered(c)
    other.scatter(np.array([0, 3, 5]), want)  # type: ignore[arg-type]
    assert torch.equal(other.gather([0, 3, 5]), want)
    other.copy_blocks(torch.tensor([0]), np.array([1]))  # type: ignore[arg-type]
    assert torch.equal(other.gather([1]), want[:1])
    for bad, shown in ((True, "True"), (1.0, "1.0"), (np.array([True])[0], "np.True_")):
        with pytest.raises(PagedCacheError, match=rf"^gather: block id {shown} is not an int$"):
            kv.gather([0, bad])  # type: ignore[list-item]
    with pytest.raises(PagedCacheError, match=r"^scatter: block id 6 is out of range 0\.\.5$"):
        kv.scatter(np.array([6]), want[:1])  # type: ignore[arg-type]
