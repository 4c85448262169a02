"""kvactors as vLLM's KV offloading backend: the ``OffloadingSpec`` vLLM 0.32 loads.

vLLM imports this module in its front-end, engine-core (scheduler) and worker
processes. The scheduler gets :class:`KVActorsManager` (metadata only: the
kvactors managers of the CPU and NVMe tiers), each worker gets
:class:`KVActorsWorker` (the bytes: the CPU pool and the NVMe files). The
plans travel inside vLLM's connector metadata, so multi-process mode needs no
other channel.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
    OffloadingConnectorStats,
)
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    LookupResult,
    Medium,
    OffloadingCounterMetadata,
    OffloadingEvent,
    OffloadingGaugeMetadata,
    OffloadingManager,
    OffloadingMetricMetadata,
    OffloadingSpec,
    OffloadingWorker,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
    TransferResult,
)
from vllm.v1.kv_offload.config import OffloadingConfig
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvactors.errors import KVActorsError
from kvactors.keys import Key
from kvactors.media.remote import RemoteStore
from kvactors.vllm.config import VLLMSettings, num_slots, nvme_io_backend, parse_settings
from kvactors.vllm.mover import BlockMover
from kvactors.vllm.paged_rows import GPUBlocks, PagedRows
from kvactors.vllm.prefetch import Mailbox, MailboxReader, Prefetcher, mailbox_path
from kvactors.vllm.tiers import COUNTERS, CPU, NVME, TieredManager, TransferPlan

__all__ = [
    "KVActorsLoadStoreSpec",
    "KVActorsManager",
    "KVActorsOffloadingSpec",
    "KVActorsWorker",
]

METRIC_PREFIX = "vllm:kvactors_"

_COUNTER_DOCS = {
    "cpu_load_blocks": "Blocks loaded into the paged KV cache from the CPU tier.",
    "nvme_load_blocks": "Blocks loaded into the paged KV cache from the NVMe tier.",
    "store_blocks": "Blocks stored from the paged KV cache into the CPU tier.",
    "promoted_blocks": "NVMe blocks copied up into the CPU tier by a load.",
    "demoted_blocks": "CPU victims written down to the NVMe tier.",
    "write_through_blocks": "Stored blocks also written to NVMe (write_mode='through').",
    "dropped_blocks": "CPU victims lost: no NVMe tier, or no NVMe room.",
    "failed_stores": "prepare_store calls refused: every CPU slot pinned or being written.",
    "prefetched_blocks": "NVMe blocks read into the CPU tier ahead of their load, from lookups.",
    "remote_store_blocks": "Stored blocks also written to the remote store.",
    "remote_fetched_blocks": "Blocks read from the remote store into CPU, from lookups.",
    "remote_fetch_failures": "Remote reads that missed (evicted, down, or corrupt).",
    "prefetch_failures": "Prefetch reads that failed (I/O error, checksum): the block dropped.",
}


class KVActorsLoadStoreSpec(LoadStoreSpec):  # type: ignore[misc]
    """The CPU-side half of a vLLM transfer job: a kvactors :class:`TransferPlan`."""

    def __init__(self, plan: TransferPlan) -> None:
        self.plan = plan

    def __repr__(self) -> str:
        return f"KVActorsLoadStoreSpec({self.plan!r})"


class _RequestKeys:
    """Keys a request used (loaded, or offered for storing while a tier held them),
    in first-seen order, and the keys its lookups prefetched from NVMe (their hits
    are reported as disk hits)."""

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self.seen: set[Key] = set()
        self.prefetched: set[Key] = set()
        self.remote: set[Key] = set()

    def add(self, keys: Iterable[Key]) -> None:
        for key in keys:
            if key not in self.seen:
                self.seen.add(key)
                self.keys.append(key)


class KVActorsManager(OffloadingManager):  # type: ignore[misc]
    """vLLM 0.32's scheduler-side ``OffloadingManager`` over a :class:`TieredManager`."""

    def __init__(
        self,
        tiers: TieredManager,
        prefetcher: Prefetcher | None = None,
        remote: RemoteStore | None = None,
    ) -> None:
        self.tiers = tiers
        self.prefetcher = prefetcher
        self.remote = remote if prefetcher is not None else None

    def _track(self, req_context: ReqContext, keys: Iterable[Key]) -> _RequestKeys:
        state: _RequestKeys | None = req_context.get_state(_RequestKeys)
        if state is None:
            state = _RequestKeys()
            req_context.set_state(state)
        state.add(keys)
        return state

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        self._track(req_context, ())
        return RequestOffloadingContext()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        prefetcher = self.prefetcher
        if prefetcher is not None:
            prefetcher.poll()
        found = self.tiers.lookup(key)
        if found == "hit":
            # A block only NVMe holds: read it into CPU now, vLLM asks again later.
            if prefetcher is not None and self.tiers.source(key) == NVME and prefetcher.start(key):
                self._track(req_context, ()).prefetched.add(key)
                return LookupResult.HIT_PENDING
            return LookupResult.HIT
        if found == "pending":
            return LookupResult.HIT_PENDING
        if self._in_remote(key) and prefetcher is not None and prefetcher.start(key, True):
            self._track(req_context, ()).remote.add(key)
            return LookupResult.HIT_PENDING
        return LookupResult.MISS

    def _in_remote(self, key: Key) -> bool:
        if self.remote is None:
            return False
        try:
            return self.remote.contains([key])[0]
        except KVActorsError:  # a server that is down holds nothing for now
            return False

    def get_load_source(self, key: OffloadKey, req_context: ReqContext) -> CacheHitSource:
        state = req_context.get_state(_RequestKeys)
        if state is not None and key in state.prefetched:
            return CacheHitSource.DISK
        if state is not None and key in state.remote:
            return CacheHitSource.EXTERNAL_UNSPECIFIED  # vLLM 0.32 has no remote source
        source = self.tiers.source(key)
        if source == NVME:
            return CacheHitSource.DISK
        return CacheHitSource.HOST if source == CPU else CacheHitSource.EXTERNAL_UNSPECIFIED

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        keys = list(keys)
        self._track(req_context, keys)
        return KVActorsLoadStoreSpec(self.tiers.prepare_load(keys))

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self.tiers.complete_load(frozenset(keys))

    def prepare_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext
    ) -> PrepareStoreOutput | None:
        keys = list(keys)
        # Offered keys a tier holds already were used again (GPU prefix-cache hits);
        # the ones stored now are not uses: an admission policy learns from that.
        self._track(req_context, [key for key in keys if self.tiers.holds(key)])
        out = self.tiers.prepare_store(keys)
        if out is None:
            return None
        to_store, plan = out
        return PrepareStoreOutput(
            keys_to_store=to_store, store_spec=KVActorsLoadStoreSpec(plan), evicted_keys=[]
        )

    def complete_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True
    ) -> None:
        self.tiers.complete_store(frozenset(keys), success)

    def on_request_finished(self, req_context: ReqContext) -> None:
        # vLLM 0.32 applies recency here (its scheduler never calls touch()).
        state = req_context.get_state(_RequestKeys)
        if state is None or not state.keys:
            return
        keys = state.keys
        positions = {k: req_context.get_offload_key_position(k) for k in keys}
        if all(p is not None for p in positions.values()):
            keys = sorted(keys, key=lambda k: positions[k] or 0)
        self.tiers.finish(keys)
        state.keys = []

    def take_events(self) -> Iterable[OffloadingEvent]:
        for keys, tier, removed in self.tiers.take_events():
            medium = Medium.CPU if tier == CPU else Medium.STORAGE
            yield OffloadingEvent(keys=keys, medium=medium, removed=removed)

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        if self.prefetcher is not None:
            self.prefetcher.poll()

    def has_pending_work(self) -> bool:
        # keeps vLLM stepping (and its workers serving the moves) while prefetches run
        if self.prefetcher is None:
            return False
        self.prefetcher.poll()
        return self.prefetcher.in_flight > 0

    def reset_cache(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.drain()
            self.prefetcher.forget()
        self.tiers.reset()

    def shutdown(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.remote is not None:
            self.remote.close()

    def get_stats(self) -> OffloadingConnectorStats | None:
        stats = OffloadingConnectorStats()
        for name, value in self.tiers.take_counters().items():
            stats.increase_counter(METRIC_PREFIX + name, value)
        for tier, used in self.tiers.usage().items():
            stats.set_gauge(f"{METRIC_PREFIX}{tier}_usage", used)
        return stats


class KVActorsWorker(OffloadingWorker):  # type: ignore[misc]
    """vLLM 0.32's ``OffloadingWorker``: jobs go to a :class:`BlockMover`, in order."""

    def __init__(self, mover: BlockMover) -> None:
        self.mover = mover

    @staticmethod
    def _blocks(spec: GPULoadStoreSpec) -> GPUBlocks:
        return GPUBlocks(
            [int(b) for b in spec.block_ids],
            [int(n) for n in spec.group_sizes],
            [int(i) for i in spec.block_indices],
        )

    def submit_store(
        self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec
    ) -> bool:
        assert isinstance(dst_spec, KVActorsLoadStoreSpec)
        self.mover.submit(job_id, True, self._blocks(src_spec), dst_spec.plan)
        return True

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        assert isinstance(src_spec, KVActorsLoadStoreSpec)
        self.mover.submit(job_id, False, self._blocks(dst_spec), src_spec.plan)
        return True

    def get_finished(self) -> list[TransferResult]:
        return [
            TransferResult(r.job_id, r.success, r.nbytes, r.seconds) for r in self.mover.finished()
        ]

    def wait(self, job_ids: set[int]) -> None:
        self.mover.wait(set(job_ids))

    def shutdown(self) -> None:
        self.mover.close()


class KVActorsOffloadingSpec(OffloadingSpec):  # type: ignore[misc]
    """Enable with ``kv_connector="OffloadingConnector"`` and
    ``kv_connector_extra_config={"spec_name": "KVActorsOffloadingSpec",
    "spec_module_path": "kvactors.vllm", "cpu_bytes": ...}`` (see docs/vllm.md)."""

    @classmethod
    def build_metric_definitions(
        cls, extra_config: dict[str, Any]
    ) -> dict[str, OffloadingMetricMetadata]:
        """The metrics the backend reports; ``extra_config`` is checked as the engine
        checks it (:func:`~kvactors.vllm.config.parse_settings`: a bad value is a
        ``ConfigError`` naming its key, in the front-end too)."""
        settings = parse_settings(extra_config)
        defs: dict[str, OffloadingMetricMetadata] = {
            METRIC_PREFIX + name: OffloadingCounterMetadata(documentation=_COUNTER_DOCS[name])
            for name in COUNTERS
        }
        defs[METRIC_PREFIX + "cpu_usage"] = OffloadingGaugeMetadata(
            documentation="Fraction of the CPU tier's slots in use."
        )
        if settings.nvme_bytes > 0:
            defs[METRIC_PREFIX + "nvme_usage"] = OffloadingGaugeMetadata(
                documentation="Fraction of the NVMe tier's slots in use."
            )
        return defs

    def __init__(self, config: OffloadingConfig) -> None:
        super().__init__(config)
        self.settings: VLLMSettings = parse_settings(self.extra_config)
        world = config.parallel.world_size
        row = config.worker_kv_bytes_per_block * self.blocks_per_chunk
        self.cpu_slots = num_slots(self.settings.cpu_bytes, row, world, "cpu_bytes")
        self.nvme_slots = num_slots(self.settings.nvme_bytes, row, world, "nvme_bytes")
        # kvikio asked for where it cannot load: a ConfigError at engine start
        self.nvme_backend = nvme_io_backend(self.settings) if self.nvme_slots else "posix"
        self.prefetch = self.settings.prefetch and self.nvme_slots > 0
        self.row_bytes = row
        # the remote tier's reads go through the prefetch mailbox too
        self.mailbox = self.prefetch or self.settings.remote
        self.mailbox_path = mailbox_path(config.engine_id)
        self._manager: KVActorsManager | None = None
        self._worker: KVActorsWorker | None = None

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            s = self.settings
            tiers = TieredManager(
                self.cpu_slots,
                self.nvme_slots,
                policy=s.policy,
                nvme_policy=s.resolved_nvme_policy,
                write_mode=s.write_mode,
                block_size=self.tokens_per_block[0] if self.tokens_per_block else 16,
                enable_events=self.kv_events_config.enable_kv_cache_events,
                remote=s.remote,
            )
            prefetcher = None
            if self.mailbox:
                box = Mailbox(self.mailbox_path, self.config.parallel.world_size, -1)
                prefetcher = Prefetcher(tiers, box, nvme=self.prefetch)
            remote = self._remote_store(0) if s.remote else None
            self._manager = KVActorsManager(tiers, prefetcher, remote)
        return self._manager

    def _remote_store(self, rank: int) -> RemoteStore:
        """Worker ``rank``'s blocks on the remote server (the scheduler asks for rank
        0's). The fingerprint holds the model, the row size and the layout, so only
        engines whose bytes match share blocks."""
        s = self.settings
        c = self.config
        model = s.remote_model or f"{c.model.name}|{c.model.dtype}"
        layout = (
            f"rank{rank}/{c.parallel.world_size}|chunk{self.blocks_per_chunk}|"
            f"groups{len(c.groups)}|{c.kv_cache_layout}"
        )
        return RemoteStore(
            f"remote{rank}",
            self.row_bytes,
            url=s.remote_url,
            nodes=s.remote_nodes,
            username=s.remote_username,
            password=s.remote_password,
            namespace=s.remote_namespace,
            model=model,
            layout=layout,
            timeout=s.remote_timeout,
            ttl=s.remote_ttl,
        )

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._worker is None:
            rows = PagedRows(
                [t.tensor for t in kv_caches.tensors],
                [[ref.tensor_idx for ref in refs] for refs in kv_caches.group_data_refs],
                self.blocks_per_chunk,
            )
            s = self.settings
            directory = s.nvme_directory
            if directory is not None and self.config.parallel.world_size > 1:
                directory = f"{directory}/rank{self.config.parallel.rank}"
            mail = None
            world, rank = self.config.parallel.world_size, self.config.parallel.rank
            if self.mailbox:
                mail = MailboxReader(Mailbox(self.mailbox_path, world, rank), rank)
            mover = BlockMover(
                rows,
                self.cpu_slots,
                self.nvme_slots,
                nvme_directory=directory,
                nvme_backend=self.nvme_backend,
                nvme_stripes=s.nvme_stripes,
                mail=mail,
                remote=self._remote_store(rank) if s.remote else None,
            )
            self._worker = KVActorsWorker(mover)
        return self._worker
