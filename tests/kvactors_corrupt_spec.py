"""A control for the vLLM end-to-end tests: kvactors' spec whose loads write noise.

Loaded by vLLM (``spec_module_path="kvactors_corrupt_spec"``, with ``tests/`` on
``PYTHONPATH``) in every engine process. Its worker scatters the real rows,
then overwrites the loaded blocks with random bytes: if greedy tokens did not
change, the end-to-end check could not tell right bytes from wrong ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from vllm.v1.kv_offload.base import CanonicalKVCaches, OffloadingWorker

from kvactors.vllm.mover import GPUBlocks, PagedRows
from kvactors.vllm.spec import KVActorsOffloadingSpec, KVActorsWorker


class CorruptingRows(PagedRows):
    def scatter(self, blocks: GPUBlocks, pool: torch.Tensor, slots: Sequence[int]) -> None:
        super().scatter(blocks, pool, slots)
        for t in self.tensors:
            idx = torch.tensor(blocks.block_ids, dtype=torch.long)
            noise = torch.randint(0, 256, (len(blocks.block_ids), t.shape[1]), dtype=torch.uint8)
            t.index_copy_(0, idx, noise)


class CorruptingSpec(KVActorsOffloadingSpec):
    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        worker = super().get_worker(kv_caches)
        assert isinstance(worker, KVActorsWorker)
        worker.mover.rows.__class__ = CorruptingRows
        return worker
