"""The KV tensors attention kernels read, and block moves between them and offload rows.

Layout, per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (index 0
of the first dimension holds keys, 1 values), the layout of vLLM's paged
attention. Token ``p`` of a sequence whose block table is ``table`` lives at
``layer[:, table[p // block_size], p % block_size]``.

One *offload row* is one block gathered across all layers: ``block_size_bytes``
bytes laid out ``[num_layers, 2, block_size, num_kv_heads, head_dim]`` in the
cache's dtype. ``gather`` builds rows from blocks and ``scatter`` writes rows back,
both batched over many blocks (on the CPU one ``memcpy`` per run of adjacent
blocks and layer half, see :func:`copy_row_runs`); ``copy_blocks`` copies blocks inside the pool
(copy-on-write for forks, defragmentation). Every move works on ``uint8`` views,
so every dtype (fp8 included) moves bit for bit.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch

from kvactors.errors import ConfigError, PagedCacheError, TensorSpecError
from kvactors.media.memory import adjacent_runs
from kvactors.paged.config import KVCacheConfig

__all__ = ["KVTensors", "copy_row_runs"]

_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _block_id(value: object, what: str) -> int:
    """``value`` as an ``int`` if it is an integer (a numpy or torch integer too),
    not a bool; PagedCacheError otherwise."""
    dtype = str(getattr(value, "dtype", ""))
    if not isinstance(value, bool) and "bool" not in dtype:
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise PagedCacheError(f"{what}: block id {value!r} is not an int")


def copy_row_runs(src: Any, src_rows: Sequence[int], dst: Any, dst_rows: Sequence[int]) -> None:
    """``dst[dst_rows[i]] = src[src_rows[i]]`` for 2-D numpy arrays whose rows are
    contiguous (the arrays themselves may be strided views): one slice copy, a
    single ``memcpy`` pass, per run of rows adjacent in both lists.

    On the CPU this moves rows at memory speed; torch's ``index_put_`` and
    ``index_copy_`` go element by element and ``index_select`` into a strided
    ``out`` buffers, several times slower for KV-sized rows.
    """
    for s, d, n in adjacent_runs(src_rows, dst_rows):
        dst[d : d + n] = src[s : s + n]


class KVTensors:
    """The paged KV cache's tensors, one per layer.

    ``layers`` may be given (tensors an engine already owns); they must have the
    layout, dtype and device ``config`` describes, else
    :class:`~kvactors.errors.TensorSpecError`. Otherwise zeroed tensors are
    allocated on ``config.resolved_device()``.
    """

    def __init__(self, config: KVCacheConfig, layers: Sequence[torch.Tensor] | None = None) -> None:
        if not isinstance(config, KVCacheConfig):
            raise ConfigError(f"config: expected a KVCacheConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.shape = (2, c.num_gpu_blocks, c.block_size, c.num_kv_heads, c.head_dim)
        if layers is None:
            device = c.resolved_device()
            self.layers = [
                torch.zeros(self.shape, dtype=c.torch_dtype, device=device)
                for _ in range(c.num_layers)
            ]
        else:
            try:
                self.layers = list(layers)
            except TypeError:
                raise TensorSpecError(
                    f"layers: expected a sequence of {c.num_layers} tensors, "
                    f"got {type(layers).__name__}"
                ) from None
            self._check_layers()
        self.device = self.layers[0].device
        # Per layer, a view [2, num_blocks, words of one block of keys (or values)],
        # in the widest integer type that divides it: moves go a word, not a byte, at a time.
        self._side_bytes = c.block_size * c.num_kv_heads * c.head_dim * c.torch_dtype.itemsize
        self._word = next(w for w in _WORDS if self._side_bytes % w.itemsize == 0)
        if any(t.data_ptr() % self._word.itemsize for t in self.layers):
            self._word = torch.uint8
        self._raw = [
            t.view(torch.uint8).view(2, c.num_gpu_blocks, -1).view(self._word) for t in self.layers
        ]

    def _check_layers(self) -> None:
        c = self.config
        if len(self.layers) != c.num_layers:
            raise TensorSpecError(
                f"layers: expected {c.num_layers} tensors, got {len(self.layers)}"
            )
        device = self.layers[0].device
        for i, t in enumerate(self.layers):
            if not isinstance(t, torch.Tensor):
                raise TensorSpecError(
                    f"layers[{i}]: expected a torch.Tensor, got {type(t).__name__}"
                )
            if tuple(t.shape) != self.shape:
                raise TensorSpecError(
                    f"layers[{i}]: expected shape {self.shape}, got {tuple(t.shape)}"
                )
            if t.dtype != c.torch_dtype:
                raise TensorSpecError(f"layers[{i}]: expected dtype {c.dtype}, got {t.dtype}")
            if t.device != device:
                raise TensorSpecError(f"layers[{i}]: on {t.device}, layers[0] is on {device}")
            if not t.is_contiguous():
                raise TensorSpecError(f"layers[{i}]: must be contiguous")

    def key_cache(self, layer: int) -> torch.Tensor:
        """Keys of ``layer``: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (a view)."""
        return self.layers[layer][0]

    def value_cache(self, layer: int) -> torch.Tensor:
        """Values of ``layer``: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (a view)."""
        return self.layers[layer][1]

    # -- block moves ----------------------------------------------------------------

    def _index(
        self, block_ids: Sequence[int], what: str, unique: bool
    ) -> tuple[torch.Tensor, list[int]]:
        """``block_ids`` checked, as an index tensor and a list of ``int``s."""
        n = self.config.num_gpu_blocks
        ids = list(block_ids)
        for i, b in enumerate(ids):
            if type(b) is not int:
                ids[i] = b = _block_id(b, what)
            if not 0 <= b < n:
                raise PagedCacheError(f"{what}: block id {b!r} is out of range 0..{n - 1}")
        if unique and len(set(ids)) != len(ids):
            raise PagedCacheError(f"{what}: a destination block id is named twice")
        return torch.tensor(ids, dtype=torch.long, device=self.device), ids

    def _rows(self, rows: torch.Tensor, n: int, what: str) -> torch.Tensor:
        """``rows`` as a ``[n, num_layers, 2, side_bytes]`` uint8 view."""
        bb = self.config.block_size_bytes
        if not isinstance(rows, torch.Tensor):
            raise TensorSpecError(f"{what}: expected a torch.Tensor, got {type(rows).__name__}")
        if rows.dim() == 0 or rows.shape[0] != n or rows.nbytes != n * bb:
            raise TensorSpecError(
                f"{what}: expected {n} rows of {bb} bytes, got shape {tuple(rows.shape)} "
                f"of {rows.dtype}"
            )
        if not rows.is_contiguous():
            raise TensorSpecError(f"{what}: rows must be contiguous")
        view = rows.view(torch.uint8).view(n, self.config.num_layers, 2, self._side_bytes)
        return view.view(self._word) if rows.data_ptr() % self._word.itemsize == 0 else view

    def _layers_as(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The per-layer views in the element type of ``rows`` (words, or bytes)."""
        if rows.dtype == self._word:
            return self._raw
        return [raw.view(torch.uint8) for raw in self._raw]

    def gather(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Offload rows of ``block_ids``: a ``(len(block_ids), block_size_bytes)`` uint8 tensor.

        Row ``i`` holds block ``block_ids[i]`` across all layers. ``out`` (contiguous,
        ``len(block_ids) * block_size_bytes`` bytes, any device) receives the rows
        and is returned; by default a new tensor on the cache's device.
        """
        idx, block_ids = self._index(block_ids, "gather", unique=False)
        n = len(block_ids)
        if out is None:
            out = torch.empty(
                (n, self.config.block_size_bytes), dtype=torch.uint8, device=self.device
            )
        view = self._rows(out, n, "gather out")
        if not n:
            return out
        if view.device != self.device:
            # Gather on the pool's device, then one contiguous copy across (D2H).
            staged = self.gather(block_ids)
            out.view(torch.uint8).view(n, -1).copy_(staged)
            return out
        if self.device.type == "cpu":
            self._host_copy(view, block_ids, into_rows=True)
            return out
        for layer, raw in enumerate(self._layers_as(view)):
            for side in (0, 1):
                torch.index_select(raw[side], 0, idx, out=view[:, layer, side])
        return out

    def _host_copy(self, view: torch.Tensor, block_ids: Sequence[int], *, into_rows: bool) -> None:
        """Host gather (``into_rows``) or scatter between the pool and offload rows
        ``view``: one slice copy per run of blocks adjacent in both, every layer and side."""
        rows_np = view.numpy()
        ids = list(block_ids)
        positions = range(len(ids))
        for layer, raw in enumerate(self._layers_as(view)):
            raw_np = raw.numpy()
            for side in (0, 1):
                if into_rows:
                    copy_row_runs(raw_np[side], ids, rows_np[:, layer, side], positions)
                else:
                    copy_row_runs(rows_np[:, layer, side], positions, raw_np[side], ids)

    def scatter(self, block_ids: Sequence[int], rows: torch.Tensor) -> None:
        """Write offload row ``i`` of ``rows`` into block ``block_ids[i]``, every layer.

        ``rows``: contiguous, ``len(block_ids) * block_size_bytes`` bytes, first
        dimension ``len(block_ids)``, any device. Raises
        :class:`~kvactors.errors.TensorSpecError` for a wrong ``rows`` and
        :class:`~kvactors.errors.PagedCacheError` for a bad or repeated block id.
        """
        idx, block_ids = self._index(block_ids, "scatter", unique=True)
        n = len(block_ids)
        view = self._rows(rows, n, "scatter rows")
        if not n:
            return
        if view.device != self.device:
            view = view.to(self.device)
        if self.device.type == "cpu":
            self._host_copy(view, block_ids, into_rows=False)
            return
        for layer, raw in enumerate(self._layers_as(view)):
            raw[:, idx] = view[:, layer].transpose(0, 1)

    def copy_blocks(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy block ``src[i]`` to block ``dst[i]`` in every layer.

        Every source is read before any destination is written, so the two lists
        may overlap (a permutation is fine). Destinations must be distinct.
        """
        if len(src) != len(dst):
            raise PagedCacheError(f"copy_blocks: {len(src)} sources for {len(dst)} destinations")
        src_idx, _ = self._index(src, "copy_blocks", unique=False)
        dst_idx, _ = self._index(dst, "copy_blocks", unique=True)
        if not len(src):
            return
        if self.device.type == "cpu":
            src_np, dst_np = src_idx.numpy(), dst_idx.numpy()
            for raw in self._raw:
                raw_np = raw.numpy()
                raw_np[:, dst_np] = raw_np[:, src_np]  # the right side is a copy: overlap is fine
            return
        for raw in self._raw:
            raw[:, dst_idx] = raw[:, src_idx]  # the right side is a copy: overlap is fine
